"""fastfair.report: run-dir contract, report files, valid plots, Pareto front, CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastfair.cli import main as cli_main
from fastfair.metrics import GroupMetrics, compute_metrics
from fastfair.report import compare_runs, load_run, main, pareto_front, write_report

RED = np.array([214, 39, 40])  # matplotlib's tab:red, the worst group's bar


def _make_run(path, seed=0, skill=1.0, num_groups=3, names=None, empty_group=None):
    """A run directory as the trainer writes it; ``skill`` scales how separable the logits are."""
    gen = torch.Generator().manual_seed(seed)
    n = 240
    y = torch.randint(0, 2, (n,), generator=gen)
    g = torch.randint(0, num_groups, (n,), generator=gen)
    if empty_group is not None:
        g[g == empty_group] = (empty_group + 1) % num_groups
    # group 0 is the hardest, so the worst group is known
    margin = skill * (1 + g.float())[:, None] * torch.nn.functional.one_hot(y, 2)
    logits = torch.randn(n, 2, generator=gen) + margin
    m = GroupMetrics(num_groups, 2)
    m.update(logits, y, g)
    path.mkdir(parents=True)
    m.save(path / "predictions_test.npz")
    if names is not None:
        (path / "meta.json").write_text(json.dumps({"group_names": names, "name": path.name}))
    return m


def _check_png(path, min_w=300, min_h=200):
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_w and im.height >= min_h
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(px, axis=0)) > 20  # not one flat colour
    return px


def test_write_report_from_run_dir(tmp_path):
    run = tmp_path / "run"
    m = _make_run(run, names=["young", "mid", "old"])
    rep = write_report(run, n_boot=50, seed=1)
    a = m.arrays()
    ref = compute_metrics(a["probs"], a["labels"], a["groups"], 3, 2, losses=a["losses"])
    on_disk = json.loads((run / "report.json").read_text())
    for key, value in ref.items():
        assert on_disk[key] == pytest.approx(value, abs=1e-6), key
    assert on_disk["ci"]["n_boot"] == 50 and on_disk["ci"]["seed"] == 1
    lo, hi = on_disk["ci"]["intervals"]["worst_group_accuracy"]
    assert 0 <= lo <= hi <= 1
    assert on_disk["group_names"] == ["young", "mid", "old"] and rep["run"] == "run"
    worst = int(np.nanargmin([v for v in ref["group_accuracy"]]))
    md = (run / "report.md").read_text()
    assert f"| {['young', 'mid', 'old'][worst]} (worst) |" in md
    assert md.count("(worst)") == 1 and "95% CI" in md
    px = _check_png(run / "group_accuracy.png")
    assert (np.abs(px.astype(int) - RED).sum(1) < 10).sum() > 500  # the worst bar is drawn red


def test_missing_group_and_dict_source(tmp_path):
    m = _make_run(tmp_path / "run", num_groups=4, empty_group=2)
    rep = m.compute(ci=True, n_boot=30)
    assert rep["missing_groups"] == [2]
    with pytest.raises(ValueError, match="needs out_dir"):
        write_report(rep)
    write_report(rep, tmp_path / "out", group_names=["a", "b", "c", "d"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| c (missing) | 0 | — |" in md and "without samples" in md
    _check_png(tmp_path / "out" / "group_accuracy.png")
    with pytest.raises(ValueError, match="3 group names for 4 groups"):
        write_report(rep, tmp_path / "out", group_names=["a", "b", "c"])


def test_load_run_contract(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    data = load_run(run)
    assert data["num_groups"] == 3 and data["num_classes"] == 2 and data["name"] == "run"
    (run / "meta.json").write_text(json.dumps({"num_groups": 5}))  # meta wins over the npz
    assert load_run(run)["num_groups"] == 5
    with pytest.raises(ValueError, match=r"predictions_val.npz not found.*predictions_test.npz"):
        load_run(run, "val")
    np.savez(run / "predictions_bad.npz", probs=np.ones((2, 2)) / 2, labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="has no array 'groups'"):
        load_run(run, "bad")
    (run / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        load_run(run)


def test_pareto_front():
    pts = [(0.9, 0.5), (0.8, 0.7), (0.7, 0.6), (0.95, 0.4), (None, 0.9), (0.9, 0.5)]
    assert pareto_front(pts) == [0, 1, 3, 5]  # (0.7, 0.6) is dominated by (0.8, 0.7); ties stay
    assert pareto_front(pts, (True, False)) == [3]  # lower y better: (0.95, 0.4) beats all
    assert pareto_front(pts, (False, True)) == [1, 2]  # lower x better: 0.7 and 0.8 trade off


def test_compare_runs_marks_the_front(tmp_path):
    runs = [tmp_path / f"r{i}" for i in range(3)]
    for i, (run, skill) in enumerate(zip(runs, (0.2, 1.0, 2.0))):
        _make_run(run, seed=i, skill=skill)
    write_report(runs[2], n_boot=30)  # its intervals are read back for the error bars
    rows = compare_runs(runs, tmp_path / "cmp")
    accs = [r["accuracy"] for r in rows]
    assert accs == sorted(accs)  # more separable logits, higher accuracy
    best = max(range(3), key=lambda i: (rows[i]["accuracy"], rows[i]["worst_group_accuracy"]))
    assert rows[best]["pareto"]
    expected = pareto_front([(r["accuracy"], r["worst_group_accuracy"]) for r in rows])
    assert [i for i, r in enumerate(rows) if r["pareto"]] == expected
    assert rows[2]["worst_group_accuracy_ci"] is not None  # from its report.json
    assert rows[0]["worst_group_accuracy_ci"] is None  # recomputed without intervals
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(rows)) and saved["y"] == "worst_group_accuracy"
    _check_png(tmp_path / "cmp" / "pareto.png")
    gap = compare_runs(runs, tmp_path / "cmp2", y="max_group_loss")
    assert all(r["max_group_loss"] > 0 for r in gap)
    with pytest.raises(ValueError, match="unknown metric .fairness.; valid names: accuracy"):
        compare_runs(runs, tmp_path / "cmp3", y="fairness")


def test_cli(tmp_path, capsys):
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for i, run in enumerate(runs):
        _make_run(run, seed=i, skill=0.5 + i)
    assert cli_main(["report", str(runs[0]), "--out", str(tmp_path / "one"), "--n-boot", "20"]) == 0
    rep = json.loads((tmp_path / "one" / "report.json").read_text())
    assert rep["ci"]["n_boot"] == 20
    out = tmp_path / "many"
    assert main([*map(str, runs), "--out", str(out), "--no-ci", "--y", "accuracy_gap"]) == 0
    # two runs named "run": the second report gets a suffix instead of overwriting the first
    assert (out / "run" / "report.json").is_file() and (out / "run_2" / "report.json").is_file()
    assert "ci" not in json.loads((out / "run" / "report.json").read_text())
    assert json.loads((out / "compare.json").read_text())["y"] == "accuracy_gap"
    _check_png(out / "pareto.png")
    capsys.readouterr()
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err

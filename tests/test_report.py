"""fastfair.report: run-dir contract, report files, valid plots, Pareto front, CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastfair.cli import main as cli_main
from fastfair.metrics import GroupMetrics, compute_metrics
from fastfair.report import (
    Bars,
    bar_plot,
    compare_runs,
    load_run,
    main,
    pareto_front,
    pareto_plot,
    write_report,
)

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


# ------------------------------------------------------------------------------- plots

def _boxes(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _texts(ax):
    return [t for t in ax.texts if t.get_text()]


def test_zero_bar_has_a_marker_and_its_value(tmp_path):
    path = tmp_path / "bars.png"
    fig = bar_plot(path, Bars(["a", "b", "c"], {"accuracy": [0.9, 0.0, 0.5]}, highlight=1))
    px = _check_png(path)
    # the stub of the zero bar is the only red: without it no red pixel would be drawn
    assert (np.abs(px.astype(int) - RED).sum(1) < 10).sum() > 40
    assert "0.000" in [t.get_text() for t in _texts(fig.axes[0])]


def _bar_panels():
    acc = [0.0, 0.95, 0.97, 1.0]
    one = Bars([f"digit<5,color={c}" for c in "rgby"], {"accuracy": acc}, metric="accuracy",
               errors={"accuracy": [[0, 0.05], [0.9, 0.99], [0.93, 1.0], [1.0, 1.0]]},
               counts=[10, 20, 30, 40], highlight=0, reference=(0.96, "overall 0.960"))
    grouped = Bars(["t1", "t2", "t3"], {"baseline": [0.9, None, 0.0], "debias": [1.0, 0.5, 0.7]},
                   metric="worst_group_accuracy", errors={"baseline": [0.01, 0.02, 0.0],
                                                          "debias": [0.03, 0.01, 0.02]},
                   n_seeds={"baseline": [3, 3, 3], "debias": [3, 1, 3]})
    return one, grouped


@pytest.mark.parametrize("which", [0, 1])
def test_bar_labels_never_over_bars_or_outside(tmp_path, which):
    fig = bar_plot(tmp_path / "b.png", _bar_panels()[which])
    ax = fig.axes[0]
    frame = _boxes(fig, [ax])[0]
    bars = _boxes(fig, [p for p in ax.patches if p.get_height() > 0])
    texts = _boxes(fig, _texts(ax))
    assert texts and bars
    for t in texts:
        assert all(_overlap(t, b) == 0 for b in bars)
        assert frame.x0 <= t.x0 and t.x1 <= frame.x1 and t.y1 <= frame.y1  # not clipped
    legend = _boxes(fig, fig.legends)[0]
    assert _overlap(legend, frame) == 0  # the legend (with the overall line) sits outside


def test_whiskers_only_with_several_seeds_and_the_legend_says_how_many(tmp_path):
    fig = bar_plot(tmp_path / "b.png", _bar_panels()[1])
    ax = fig.axes[0]
    whiskers = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(whiskers) == 4  # five bars (one missing), one of them from a single seed
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "± 1 std over 3 seeds" in labels
    fig = bar_plot(tmp_path / "c.png", Bars(["x", "y"], {"a": [0.5, 0.6]}, errors={"a": [0.1, 0.1]},
                                            n_seeds={"a": [1, 1]}))
    assert not [c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["1 seed: no error bars"]


def test_many_groups_show_the_worst_and_best_ten(tmp_path):
    acc = [i / 99 for i in range(100)]
    acc[40] = None  # a missing group is never among the extremes
    names = [f"g{i}" for i in range(100)]
    fig = bar_plot(tmp_path / "b.png", Bars(names, {"accuracy": acc}, metric="accuracy",
                                            noun="groups"))
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"g{i}" for i in range(10)] + ["⋯"] + [f"g{i}" for i in range(90, 100)]
    assert "100 groups: the 10 worst and the 10 best by accuracy" in ax.get_title()
    with Image.open(tmp_path / "b.png") as im:
        assert im.width <= 16 * 120
    # lower is better: the worst are the largest
    fig = bar_plot(tmp_path / "c.png", Bars(names, {"x": list(range(100))}, metric="accuracy_gap"))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][0] == "g99"


def test_bars_reject_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"Bars.values\['a'\] has 1 entries for 2 categories"):
        bar_plot(tmp_path / "b.png", Bars(["x", "y"], {"a": [0.5]}))
    with pytest.raises(ValueError, match="Bars.errors has series 'b' that values lacks"):
        bar_plot(tmp_path / "b.png", Bars(["x"], {"a": [0.5]}, errors={"b": [0.1]}))
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        bar_plot(tmp_path / "b.png", Bars(["x"], {"a": [0.5]}, metric="acc"))
    assert not (tmp_path / "b.png").exists()


def _sweep_points(seed=0):
    rng = np.random.default_rng(seed)
    pts, labels, ranks, errors, seeds = [], [], [], [], []
    for r in (1, 4, 16, 64):
        for lam in (0, 0.5, 1):
            pts.append((0.85 + 0.003 * np.log2(r) - 0.03 * lam + rng.normal(0, 0.005),
                        0.55 + 0.15 * lam + 0.003 * np.log2(r) + rng.normal(0, 0.01)))
            labels.append(f"r{r}_lam{lam:g}_variance_group")
            ranks.append(r)
            errors.append((0.004, [pts[-1][1] - 0.02, pts[-1][1] + 0.01]))
            seeds.append(3 if lam else 1)
    return pts, labels, ranks, errors, seeds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_labels_do_not_overlap(tmp_path, seed):
    from matplotlib.text import Text

    pts, labels, ranks, errors, seeds = _sweep_points(seed)
    fig = pareto_plot(tmp_path / "p.png", pts, "accuracy", "worst_group_accuracy", labels=labels,
                      errors=errors, n_seeds=seeds, color_by=ranks, color_name="rank")
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text() in labels]
    assert sorted(t.get_text() for t in texts) == sorted(labels)
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text, not its leader
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert all(_overlap(a, b) == 0 for b in boxes[i + 1:]), texts[i].get_text()
    _check_png(tmp_path / "p.png")


def test_pareto_legend_ranks_front_line_and_seeds(tmp_path):
    from matplotlib.lines import Line2D

    pts, labels, ranks, errors, seeds = _sweep_points()
    fig = pareto_plot(tmp_path / "p.png", pts + [(None, 0.5)], "accuracy", "accuracy_gap",
                      labels=labels + ["none"], errors=errors + [None], n_seeds=seeds + [1],
                      color_by=ranks + [1], color_name="rank")
    assert len(fig.axes) == 1  # no colour bar: one legend entry per rank
    legend = fig.axes[0].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:4] == ["rank 1", "rank 4", "rank 16", "rank 64"]
    assert "± 1 std over 3 seeds" in texts
    front = legend.legend_handles[texts.index("Pareto front (ringed)")]
    assert isinstance(front, Line2D) and front.get_linestyle() == "--" and front.get_linewidth() > 0
    # whiskers: the eight points with three seeds, none for the single-seed ones
    assert len([c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]) == 8
    assert "1 without a value left out" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="pareto_plot: 2 labels for 12 points"):
        pareto_plot(tmp_path / "q.png", pts, "accuracy", "accuracy_gap", labels=["a", "b"])


# ------------------------------------------------------- the report command never overwrites

def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_report_command_never_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    _make_run(run)
    write_report(run, n_boot=20)  # what the trainer wrote
    before = _snapshot(run)
    assert main([str(run), "--n-boot", "30"]) == 0
    assert _snapshot(run) == before  # the trainer's report is untouched
    assert json.loads((run / "report" / "report.json").read_text())["ci"]["n_boot"] == 30
    assert "wrote " + str(run / "report" / "report.md") in capsys.readouterr().out
    again = _snapshot(run / "report")
    assert main([str(run), "--n-boot", "40"]) == 2
    err = capsys.readouterr().err
    assert "already holds report.json, report.md, group_accuracy.png (split test, 30 " \
           "resamples)" in err and "--overwrite" in err
    assert _snapshot(run / "report") == again
    assert main([str(run), "--out", str(run)]) == 2  # --out at the trainer's report: refused too
    assert _snapshot(run) == before
    assert main([str(run), "--n-boot", "40", "--overwrite"]) == 0
    assert "replaced report.json, report.md, group_accuracy.png (split test, 30 resamples)" \
        in capsys.readouterr().out
    assert json.loads((run / "report" / "report.json").read_text())["ci"]["n_boot"] == 40


def test_report_command_refuses_before_writing_anything(tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for i, run in enumerate(runs):
        _make_run(run, seed=i)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    assert main([*map(str, runs), "--out", str(out), "--no-ci"]) == 2
    assert "cmp already holds compare.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["compare.json"]  # no run report either


def test_undefined_metrics_are_left_out_with_one_note(tmp_path):
    # every group holds a single class: AUC is undefined in each
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.4, 0.6], [0.7, 0.3]])
    rep = compute_metrics(probs, labels, groups, 2, 2)
    assert rep["worst_group_auc"] is None and rep["auc"] is not None
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert not any("—" in line for line in table)
    assert not any(line.startswith(("| worst_group_auc", "| auc_gap")) for line in table)
    assert "| auc ↑ |" in md  # the defined AUC stays
    assert "| group | n | accuracy | ECE | mean loss |" in md  # no AUC column, no CI column
    assert md.count("left out of the tables") == 1
    assert "undefined on this split: worst_group_auc, auc_gap, group_auc" in md

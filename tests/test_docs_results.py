"""docs/reproducing.md's tables are rendered from docs/results/*.json: they must agree, and a
changed number on either side must be caught."""
import json
import re
import shutil

import pytest

from fastfair import docs_results
from fastfair.docs_results import DOC, MARKER, RESULTS_DIR, check, fmt, render_text


def test_docs_agree_with_their_results_files():
    names = {m.group(2) for m in MARKER.finditer(DOC.read_text())}
    assert names, "docs/reproducing.md has no rendered tables"
    assert check() == [], "run `python -m fastfair.docs_results render`"


def test_every_results_file_records_its_provenance():
    for path in sorted(RESULTS_DIR.glob("*.json")):
        res = json.loads(path.read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", res["commit"]), path
        assert len(res["seeds"]) >= 3 and res["wall_time_s"] > 0 and res["rows"], path
        assert res["versions"]["torch"] and res["commands"], path


def _copy(tmp_path):
    doc = tmp_path / "reproducing.md"
    shutil.copy(DOC, doc)
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    return doc, results


def test_a_changed_number_in_the_docs_fails(tmp_path):
    doc, results = _copy(tmp_path)
    text = doc.read_text()
    m = next(MARKER.finditer(text))
    body = m.group(4)
    number = re.search(r"\d\.\d{3}", body)
    changed = body[:number.start()] + ("1.000" if number.group() != "1.000" else "0.999") + body[number.end():]
    doc.write_text(text[:m.start(4)] + changed + text[m.end(4):])
    assert check(doc, results) == [f"results:{m.group(2)}:{m.group(3)}"]


def test_a_changed_number_in_a_results_file_fails(tmp_path):
    doc, results = _copy(tmp_path)
    name = next(MARKER.finditer(doc.read_text())).group(2)
    path = results / f"{name}.json"
    res = json.loads(path.read_text())
    row = res["rows"][0]
    key = next(k for k, v in row.items() if "accuracy" in k and isinstance(v, float))
    row[key] = row[key] + 0.25
    path.write_text(json.dumps(res))
    assert any(s.startswith(f"results:{name}:") for s in check(doc, results))


def test_unknown_table_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="results:nosuch:table: no such experiment table"):
        render_text("<!-- results:nosuch:table -->\nx\n<!-- /results:nosuch:table -->\n", tmp_path)
    with pytest.raises(ValueError, match="sweep.json not found"):
        render_text("<!-- results:sweep:table -->\nx\n<!-- /results:sweep:table -->\n", tmp_path)


def test_summaries_use_the_sample_std_and_show_one_seed_without_one():
    assert fmt([1.0, 2.0, 3.0]) == "2.000 ± 1.000"  # sample std; the population one is 0.816
    assert fmt([0.5, None, float("nan")]) == "0.500"
    assert fmt([]) == "n/a"
    assert set(docs_results.EXPERIMENTS) >= {"main_job", "sweep", "debias", "bias_transfer"}


def test_per_seed_commands_run_once_per_seed_and_are_recorded(tmp_path, monkeypatch):
    def collect(work):
        return [{"seed": int(p.name[1:]), "v": float(p.read_text())} for p in sorted(work.glob("s*"))], {}

    exp = docs_results.Experiment(
        commands=[], seeds=[0, 1, 2], collect=collect,
        per_seed=["python -c \"import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])\" "
                  "{work}/s{seed} {seed}.5"])
    monkeypatch.setitem(docs_results.EXPERIMENTS, "toy", exp)
    path = docs_results.run("toy", tmp_path / "work", seeds=[3, 4], out=tmp_path / "res")
    res = json.loads(path.read_text())
    assert res["seeds"] == [3, 4] and res["rows"] == [{"seed": 3, "v": 3.5}, {"seed": 4, "v": 4.5}]
    assert [c.split()[-2:] for c in res["commands"]] == [["WORK/s3", "3.5"], ["WORK/s4", "4.5"]]

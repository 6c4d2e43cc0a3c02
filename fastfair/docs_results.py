"""Results from files, docs from results: ``python -m fastfair.docs_results {run,render,check}``.

``run NAME --work DIR`` runs one documented experiment (the commands in ``EXPERIMENTS``, each a
``fastfair`` command line) with its outputs under ``DIR`` and writes
``docs/results/NAME.json``: the commands, the git commit (and whether the tree was dirty), the
package versions, the seeds, the wall and CPU time, the machine and one row per run.
``render`` rewrites every table of ``docs/reproducing.md`` that sits between
``<!-- results:NAME:TABLE -->`` and ``<!-- /results:NAME:TABLE -->`` from those files;
``check`` exits 1 when the page and the files disagree (``tests/test_docs_results.py`` runs it).
Summaries are the mean and the *sample* standard deviation over seeds, with the seed count.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from .workflows.common import fmt_mean_std, mean_std, verdict

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "reproducing.md"
VERSIONED = ("torch", "timm", "triton", "accelerate", "peft", "scikit-learn", "numpy")

# --------------------------------------------------------------------------- the experiments

PRETRAIN = ("fastfair train --model test_vit --depth null --img-size 16 --patch-size 8 --finetune full "
            "--method erm --select-by null --binary false --correlation 0.1 --repeats 2 --epochs 6 --lr 0.001 --batch-size 64 "
            "--log-with null --report-ci false --output-dir {work}/pretrain")
COMMON = ("--model test_vit --depth null --img-size 16 --patch-size 8 "
          "--checkpoint {work}/pretrain/model/model.safetensors --binary true --repeats 2 --epochs 2 "
          "--batch-size 64 --lr 0.002 --log-with null --report-ci false")


def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def _numbers(row: dict) -> dict:
    """A CSV row with its numbers parsed (empty / None cells become None)."""
    out = {}
    for k, v in row.items():
        if v in ("", "None"):
            out[k] = None
            continue
        try:
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else float(v)
        except ValueError:
            out[k] = v
    return out


def _sweep_rows(work: Path) -> tuple[list[dict], dict]:
    keep = ("rank", "lam", "penalty", "loss_groups", "seed", "test/accuracy", "test/worst_group_accuracy",
            "test/accuracy_gap", "test/equalized_odds_difference", "val/worst_group_accuracy")
    with (work / "sweep" / "sweep.csv").open() as f:
        rows = [{k: r.get(k) for k in keep} for r in map(_numbers, csv.DictReader(f))]
    pre = _read_json(work / "pretrain" / "report.json")
    return rows, {"pretrain_test_accuracy": pre["accuracy"]}


def _workflow_rows(sub: str) -> Callable[[Path], tuple[list[dict], dict]]:
    def read(work: Path):
        res = _read_json(work / sub / "results.json")
        return res["rows"], {"meta": res.get("meta", {})}
    return read


def _tune_rows(work: Path) -> tuple[list[dict], dict]:
    """Per seed: the tuned configuration (best/), the base config (baseline/) and the base config at
    the tuned learning rate (baseline_tuned_lr/), val and test."""
    keep = ("accuracy", "worst_group_accuracy", "accuracy_gap", "equalized_odds_difference")
    arms = {"best": "tuned", "baseline": "baseline", "baseline_tuned_lr": "baseline at tuned lr"}
    rows = []
    for seed_dir in sorted((work / "tune").glob("seed*"), key=lambda d: int(d.name[4:])):
        for arm, label in arms.items():
            res = _read_json(seed_dir / arm / "result.json")
            rows.append({"seed": int(seed_dir.name[4:]), "arm": label, "lr": res["config"].get("lr"),
                         **{k: res["test"].get(k) for k in keep},
                         "val_worst_group_accuracy": res["val"].get("worst_group_accuracy")})
    return rows, {}


@dataclass
class Experiment:
    commands: list[str]  # `fastfair ...` or `python ...` lines; {work}: the work directory, {seeds}: the seeds
    seeds: list[int]
    collect: Callable[[Path], tuple[list[dict], dict]]
    tables: dict[str, Callable[[dict], str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # environment of the commands ({work} filled)
    per_seed: list[str] = field(default_factory=list)  # run once per seed after `commands`: {seed}


# filled below, once the table renderers exist
EXPERIMENTS: dict[str, Experiment] = {}

# --------------------------------------------------------------------------- summaries


def fmt(values, digits: int = 3) -> str:
    """Mean ± sample std of the non-missing values ("n/a" without any, no std with one)."""
    return fmt_mean_std(*mean_std(values), digits)


def group_rows(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _sweep_table(res: dict) -> str:
    body = []
    cols = ("test/accuracy", "test/worst_group_accuracy", "test/accuracy_gap", "val/worst_group_accuracy")
    for (rank, lam, pen), sel in sorted(group_rows(res["rows"], ("rank", "lam", "penalty")).items(),
                                        key=lambda kv: (kv[0][1], kv[0][0])):
        label = "0 (ERM)" if lam == 0 else f"{lam:g} ({pen})"
        body.append([str(rank), label, str(len(sel))] + [fmt([r[c] for r in sel]) for c in cols])
    return markdown_table(["rank", "λ", "seeds", "test accuracy", "test worst-group acc.",
                           "test accuracy gap", "val worst-group acc."], body)


def _sweep_pretrain(res: dict) -> str:
    return markdown_table(["pre-training test accuracy (10 classes, 1 run, data seed 0)"],
                          [[f"{res['extra']['pretrain_test_accuracy']:.3f}"]])


def _debias_table(res: dict) -> str:
    body = []
    for (task, arm), sel in group_rows(res["rows"], ("task", "arm")).items():
        body.append([task, arm, str(len(sel))] + [fmt([r[c] for r in sel]) for c in
                                                  ("accuracy", "worst_group_accuracy", "counterfactual_flip")])
    return markdown_table(["task", "arm", "seeds", "accuracy", "worst-group acc", "counterfactual flip"], body)


def _debias_gains(res: dict) -> str:
    """Per task and seed: the frozen upstream adapter's change against the baseline."""
    by = {(r["task"], r["arm"], r["seed"]): r for r in res["rows"]}
    body = []
    for task in dict.fromkeys(r["task"] for r in res["rows"] if r["arm"] == "debias"):
        for key in ("accuracy", "counterfactual_flip"):
            d = [by[(task, "debias", s)][key] - by[(task, "baseline", s)][key] for s in res["seeds"]
                 if (task, "baseline", s) in by and by[(task, "debias", s)][key] is not None]
            body.append([task, key, ", ".join(f"{x:+.3f}" for x in d), fmt(d),
                         verdict(*mean_std(d), higher_is_better=key == "accuracy")])
    return markdown_table(["task", "metric", "debias − baseline per seed", "mean ± std", "verdict"], body)


def _mode(r: dict) -> str:
    return f"{r['mode']} r={r['rank']}" if r.get("rank") else r["mode"]


def _transfer_table(res: dict) -> str:
    body = []
    for (source, target, mode, rank), sel in group_rows(res["rows"], ("source", "target", "mode", "rank")).items():
        body.append([source, target, _mode({"mode": mode, "rank": rank}), str(len(sel))]
                    + [fmt([r[c] for r in sel], 2) for c in ("accuracy", "asr", "flip_rate")])
    return markdown_table(["source", "target data", "mode", "seeds", "accuracy", "ASR", "flip rate"], body)


def _transfer_excess(res: dict) -> str:
    """Excess ASR (triggered − control source) per mode, target and seed."""
    by = {(r["source"], r["target"], _mode(r), r["seed"]): r["asr"] for r in res["rows"]}
    body = []
    for target in ("plain", "debiased"):
        for mode in dict.fromkeys(_mode(r) for r in res["rows"] if r["source"] == "control" and r["target"] == target):
            d = [by[("triggered", target, mode, s)] - by[("control", target, mode, s)] for s in res["seeds"]
                 if by.get(("triggered", target, mode, s)) is not None and by.get(("control", target, mode, s)) is not None]
            word = {"better": "inherited", "worse": "below control"}.get(verdict(*mean_std(d)), "tie with 0")
            body.append([target, mode, ", ".join(f"{x:+.2f}" for x in d), fmt(d, 2), word])
    return markdown_table(["target data", "mode", "excess ASR per seed", "mean ± std", "verdict"], body)


def _tune_table(res: dict) -> str:
    cols = ("accuracy", "worst_group_accuracy", "accuracy_gap", "equalized_odds_difference",
            "val_worst_group_accuracy")
    body = [[arm, str(len(sel))] + [fmt([r[c] for r in sel]) for c in cols]
            for (arm,), sel in group_rows(res["rows"], ("arm",)).items()]
    return markdown_table(["arm", "seeds", "test accuracy", "test worst-group acc.", "test accuracy gap",
                           "test equalized odds diff.", "val worst-group acc."], body)


def _tune_gains(res: dict) -> str:
    """Per seed: the tuned configuration's change against each comparison arm."""
    by = {(r["arm"], r["seed"]): r for r in res["rows"]}
    body = []
    for other in dict.fromkeys(r["arm"] for r in res["rows"] if r["arm"] != "tuned"):
        for key in ("accuracy", "worst_group_accuracy", "accuracy_gap"):
            d = [by[("tuned", s)][key] - by[(other, s)][key] for s in res["seeds"]
                 if ("tuned", s) in by and (other, s) in by]
            body.append([other, key, ", ".join(f"{x:+.3f}" for x in d), fmt(d),
                         verdict(*mean_std(d), higher_is_better=key != "accuracy_gap")])
    return markdown_table(["against", "test metric", "tuned − it per seed", "mean ± std", "verdict"], body)


EXPERIMENTS.update({
    "sweep": Experiment(
        commands=[PRETRAIN, "fastfair sweep " + COMMON + " --ranks 1,4,16 --lams 0,1 --penalties variance "
                  "--group-keys group --seeds {seeds} --data-seed 0 --output-dir {work}/sweep"],
        seeds=[0, 1, 2, 3, 4], collect=_sweep_rows, tables={"table": _sweep_table, "pretrain": _sweep_pretrain}),
    "debias": Experiment(
        commands=["fastfair debias --model test_vit --img-size 16 --patch-size 8 --depth 2 --batch-size 64 "
                  "--repeats 2 --epochs 6 --backbone-epochs 15 --control --seeds {seeds} "
                  "--log-with null --report-ci false --output-dir {work}/debias"],
        seeds=[0, 1, 2], collect=_workflow_rows("debias"),
        tables={"table": _debias_table, "gains": _debias_gains}),
    "bias_transfer": Experiment(
        commands=["fastfair bias-transfer --model test_vit --img-size 16 --patch-size 8 --depth 2 --batch-size 64 "
                  "--repeats 2 --epochs 6 --source-epochs 15 --linear-lr 0.01 "
                  "--modes linear,lora:1,lora:8,fairlora:8,full,scratch --debias-target 0.5 --seeds {seeds} "
                  "--log-with null --report-ci false --output-dir {work}/bias_transfer"],
        seeds=[0, 1, 2], collect=_workflow_rows("bias_transfer"),
        tables={"table": _transfer_table, "excess": _transfer_excess}),
    "tune": Experiment(
        commands=[],
        per_seed=["fastfair tune --backbone pretrain --n-trials 8 --compare-baseline --seed {seed} "
                  "--log-with null --report-ci false --output-dir {work}/tune/seed{seed}"],
        seeds=[0, 1, 2, 3, 4], collect=_tune_rows, tables={"table": _tune_table, "gains": _tune_gains},
        env={"FASTFAIR_CACHE_DIR": "{work}/cache"}),  # one pre-trained backbone, shared by the seeds
    "main_job": Experiment(
        commands=["python -m fastfair.workflows.main_job --seeds {seeds} --output-dir {work}/main_job"],
        seeds=[0, 1, 2], collect=lambda work: _main_job().collect(work),
        tables={"table": lambda res: _main_job().table(res["rows"])},
        env={"FASTFAIR_CACHE_DIR": "{work}/cache"}),  # a cold cache: the pre-training is timed too
})


def _main_job():
    from .workflows import main_job  # imported when used: it pulls in the trainer

    return main_job

# --------------------------------------------------------------------------- run


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict:
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    # dirty: uncommitted changes to tracked files other than the results files experiments write
    # (an experiment started after another one finished would otherwise count its file as code).
    return {"commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/results")),
            "versions": versions, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run(name: str, work: Path, seeds: list[int] | None = None, out: Path | None = None) -> Path:
    """Run experiment ``name`` into ``work`` and write its results file; returns the file."""
    exp = EXPERIMENTS[name]
    seeds = seeds or exp.seeds
    work.mkdir(parents=True, exist_ok=True)
    commands = [c.format(work=work, seeds=",".join(map(str, seeds))) for c in exp.commands]
    commands += [c.format(work=work, seed=s) for s in seeds for c in exp.per_seed]
    prov = provenance()  # the code that runs: a commit made meanwhile must not be recorded
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, **{k: v.format(work=work) for k, v in exp.env.items()}}
    for c in commands:
        print(f"docs_results: {c}", flush=True)
        argv = shlex.split(c)
        argv = [sys.executable, "-m", "fastfair.cli", *argv[1:]] if argv[0] == "fastfair" else [sys.executable, *argv[1:]]
        subprocess.run(argv, check=True, env=env)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows, extra = exp.collect(work)
    record = {"experiment": name, "commands": [c.replace(str(work), "WORK") for c in commands],
              "env": {k: v.replace("{work}", "WORK") for k, v in exp.env.items()},
              "seeds": seeds, "wall_time_s": round(time.time() - t0, 1),
              "cpu_time_s": round((c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime), 1),
              **prov, "extra": extra, "rows": rows}
    path = (out or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path

# --------------------------------------------------------------------------- render / check

MARKER = re.compile(r"(<!-- results:(\w+):(\w+) -->\n)(.*?)(<!-- /results:\2:\3 -->)", re.S)


def render_text(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """``text`` with every marked table regenerated from ``results_dir``; an unknown experiment,
    table or missing results file is a ``ValueError`` naming it."""
    cache: dict[str, dict] = {}

    def table(m: re.Match) -> str:
        name, tab = m.group(2), m.group(3)
        if name not in EXPERIMENTS or tab not in EXPERIMENTS[name].tables:
            raise ValueError(f"marker results:{name}:{tab}: no such experiment table")
        if name not in cache:
            path = Path(results_dir) / f"{name}.json"
            if not path.is_file():
                raise ValueError(f"marker results:{name}:{tab}: {path} not found; run "
                                 f"`python -m fastfair.docs_results run {name}`")
            cache[name] = _read_json(path)
        return m.group(1) + EXPERIMENTS[name].tables[tab](cache[name]) + "\n" + m.group(5)

    return MARKER.sub(table, text)


def check(doc: Path = DOC, results_dir: Path = RESULTS_DIR) -> list[str]:
    """The marked tables of ``doc`` that differ from their results files (empty: they agree)."""
    text = Path(doc).read_text()
    fresh = render_text(text, results_dir)
    old = {(m.group(2), m.group(3)): m.group(4) for m in MARKER.finditer(text)}
    new = {(m.group(2), m.group(3)): m.group(4) for m in MARKER.finditer(fresh)}
    return [f"results:{n}:{t}" for (n, t) in old if old[(n, t)] != new[(n, t)]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastfair.docs_results", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one experiment and write docs/results/NAME.json")
    r.add_argument("name")
    r.add_argument("--work", required=True, type=Path, help="directory for the runs (outside the repo)")
    r.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
    r.add_argument("--out", type=Path, default=None, help="directory of the results file (default docs/results)")
    sub.add_parser("render", help="rewrite the marked tables of docs/reproducing.md")
    sub.add_parser("check", help="exit 1 when docs/reproducing.md and docs/results disagree")
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.name not in EXPERIMENTS:
            p.error(f"unknown experiment {args.name!r}; known: {sorted(EXPERIMENTS)}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        print(run(args.name, args.work.resolve(), seeds, args.out))
        return 0
    if args.cmd == "render":
        DOC.write_text(render_text(DOC.read_text()))
        return 0
    stale = check()
    for s in stale:
        print(f"docs/reproducing.md: {s} differs from docs/results (run `python -m fastfair.docs_results render`)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

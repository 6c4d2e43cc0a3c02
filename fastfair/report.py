"""Fairness reports: ``report.json``, ``report.md`` and plots for a run; Pareto scatter for several.

Run-directory contract (what the trainer writes and ``fastfair report RUN_DIR`` reads):

* ``predictions_<split>.npz`` (``GroupMetrics.save``): ``probs`` ``[N, C]`` float, ``labels``
  and ``groups`` ``[N]`` int, optional ``losses`` ``[N]`` float (per-sample cross-entropy;
  ``-log p[label]`` when absent), optional 0-d ``num_groups`` and ``num_classes``;
* ``meta.json`` (optional): ``num_groups``, ``num_classes`` (these win over the npz's; without
  either, ``max + 1`` of the groups and the width of ``probs``), ``group_names``,
  ``class_names``, ``name`` (the run's label in comparisons; default the directory name).

``write_report`` recomputes every metric from the predictions with bootstrap intervals and
writes ``report.json`` (the :func:`fastfair.metrics.compute_metrics` dict, its ``ci``, and
``run``, ``split``, ``group_names``, ``class_names``), ``report.md`` and
``group_accuracy.png``. ``compare_runs`` reads each run's ``report.json`` of that split when
present (for its intervals), else its predictions, and writes ``compare.json``, ``compare.md``
and ``pareto.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from .metrics import HIGHER_IS_BETTER, bootstrap, compute_metrics

SCALAR_KEYS = (
    "accuracy", "balanced_accuracy", "worst_group_accuracy", "accuracy_gap", "auc",
    "worst_group_auc", "auc_gap", "equalized_odds_difference", "equal_opportunity_difference",
    "demographic_parity_difference", "ece_gap", "loss_variance",
)


def load_run(run_dir, split: str = "test") -> dict:
    """Predictions and metadata of a run directory (see the module docstring)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run directory {str(run)!r} does not exist")
    path = run / f"predictions_{split}.npz"
    if not path.is_file():
        have = sorted(p.name for p in run.glob("predictions_*.npz"))
        raise ValueError(f"{path} not found; the run has {have or 'no predictions_<split>.npz'}")
    with np.load(path) as z:
        for key in ("probs", "labels", "groups"):
            if key not in z:
                raise ValueError(f"{path} has no array {key!r} (it has {sorted(z.files)})")
        data = {k: z[k] for k in z.files}
    meta = {}
    if (run / "meta.json").is_file():
        try:
            meta = json.loads((run / "meta.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{run / 'meta.json'} is not valid JSON: {e}") from None
    probs, groups = data["probs"], data["groups"]
    if probs.ndim != 2:
        raise ValueError(f"{path}: probs must be [N, C], got shape {probs.shape}")

    def size(key: str, default: int) -> int:
        if meta.get(key) is not None:
            return int(meta[key])
        return int(data[key]) if key in data else default

    return {
        "name": str(meta.get("name") or run.resolve().name),
        "probs": probs, "labels": data["labels"], "groups": groups,
        "losses": data.get("losses"),
        "num_groups": size("num_groups", int(groups.max()) + 1 if groups.size else 1),
        "num_classes": size("num_classes", probs.shape[1]),
        "group_names": list(meta.get("group_names") or []),
        "class_names": list(meta.get("class_names") or []),
    }


def _names(names, n: int) -> list[str]:
    if names and len(names) != n:
        raise ValueError(f"{len(names)} group names for {n} groups")
    return [str(x) for x in names] if names else [f"group {i}" for i in range(n)]


def _fmt(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _worst(values) -> int | None:
    ok = [(v, i) for i, v in enumerate(values) if v is not None]
    return min(ok)[1] if ok else None


def _markdown(rep: dict) -> str:
    ci = (rep.get("ci") or {}).get("intervals", {})
    level = (rep.get("ci") or {}).get("level")
    ci_head = f"{round(100 * level)}% CI" if level else "CI"
    n = sum(rep["group_count"])
    lines = [f"# Fairness report: {rep['run']} ({rep['split']}, {n} samples)", "",
             f"| metric | value | {ci_head} |", "|---|---|---|"]
    for key in SCALAR_KEYS:
        arrow = "↑" if HIGHER_IS_BETTER[key] else "↓"
        lines.append(f"| {key} {arrow} | {_fmt(rep[key])} | {_fmt_ci(ci.get(key))} |")
    worst = _worst(rep["group_accuracy"])
    group_ci = ci.get("group_accuracy") or [None] * len(rep["group_count"])
    lines += ["", f"| group | n | accuracy | {ci_head} | AUC | ECE | mean loss |",
              "|---|---|---|---|---|---|---|"]
    for i, name in enumerate(rep["group_names"]):
        mark = " (worst)" if i == worst else ""
        if rep["group_count"][i] == 0:
            mark = " (missing)"
        lines.append(
            f"| {name}{mark} | {rep['group_count'][i]} | {_fmt(rep['group_accuracy'][i])} | "
            f"{_fmt_ci(group_ci[i])} | {_fmt(rep['group_auc'][i])} | "
            f"{_fmt(rep['group_ece'][i])} | {_fmt(rep['group_loss'][i])} |")
    if rep["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in rep["notes"]]
    if rep.get("ci"):
        lines += ["", f"Intervals: {rep['ci']['method']}, {rep['ci']['n_boot']} resamples, "
                      f"seed {rep['ci']['seed']}."]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot, so a user's interactive backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_group_accuracy(rep: dict, path) -> None:
    """Bars of per-group accuracy with interval whiskers, the worst group in red."""
    acc, names = rep["group_accuracy"], rep["group_names"]
    G = len(acc)
    ci = ((rep.get("ci") or {}).get("intervals") or {}).get("group_accuracy") or [None] * G
    worst = _worst(acc)
    fig = _figure(max(4.0, 0.6 * G + 2), 3.6)
    ax = fig.add_subplot()
    x = np.arange(G)
    heights = [0.0 if v is None else v for v in acc]
    colors = ["tab:red" if i == worst else "tab:blue" for i in range(G)]
    ax.bar(x, heights, color=colors)
    for i in range(G):
        if acc[i] is None:
            ax.text(i, 0.5, "missing", ha="center", va="center", rotation=90, fontsize=8,
                    color="gray")
        elif ci[i] is not None:
            lo, hi = ci[i]
            ax.errorbar(i, acc[i], yerr=[[max(acc[i] - lo, 0)], [max(hi - acc[i], 0)]],
                        color="black", capsize=3, lw=1)
    if worst is not None and acc[worst] > 0.08:
        ax.text(worst, 0.03, "worst", ha="center", va="bottom", color="white", fontsize=8,
                fontweight="bold")
    ax.axhline(rep["accuracy"], color="gray", ls="--", lw=1)
    ax.text(-0.55, rep["accuracy"] + 0.01, f"overall {rep['accuracy']:.3f}", va="bottom",
            ha="left", fontsize=7, color="dimgray")
    # attribute lists ("digit<5,color=red") break at their commas so neighbours don't overlap
    ax.set_xticks(x, [f"{nm.replace(',', chr(10))}\n(n={c})" for nm, c in zip(names, rep["group_count"])],
                  rotation=30 if G > 6 else 0, fontsize=7, ha="right" if G > 6 else "center")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    level = (rep.get("ci") or {}).get("level")
    whiskers = f", {round(100 * level)}% bootstrap intervals" if level else ""
    ax.set_title(f"{rep['run']} ({rep['split']}): accuracy per group{whiskers}", fontsize=9)
    ax.set_xlim(-0.6, G - 0.4)
    fig.tight_layout()
    fig.savefig(path)


def write_report(
    source, out_dir=None, split: str = "test", ci: bool = True, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95, group_names=None,
) -> dict:
    """Write ``report.json``, ``report.md`` and ``group_accuracy.png``; returns the report dict.

    ``source`` is a run directory (metrics recomputed from ``predictions_<split>.npz``, with
    intervals unless ``ci=False``) or a dict from :func:`compute_metrics` /
    ``GroupMetrics.compute`` (its ``ci``, if any, is used as is). ``out_dir`` defaults to the run
    directory; it is required for a dict.
    """
    if isinstance(source, dict):
        if out_dir is None:
            raise ValueError("write_report of a metrics dict needs out_dir")
        missing = [k for k in SCALAR_KEYS + ("group_accuracy", "group_count") if k not in source]
        if missing:
            raise ValueError(f"metrics dict lacks {missing}: pass a compute_metrics() result")
        rep = dict(source)
        rep.setdefault("run", "metrics")
        rep.setdefault("split", split)
        names = group_names or source.get("group_names")
        rep["group_names"] = _names(names, len(source["group_count"]))
    else:
        run = load_run(source, split)
        out_dir = source if out_dir is None else out_dir
        args = (run["probs"], run["labels"], run["groups"], run["num_groups"], run["num_classes"])
        rep = {"run": run["name"], "split": split}
        rep.update(compute_metrics(*args, losses=run["losses"]))
        if ci:
            rep["ci"] = bootstrap(*args, losses=run["losses"], n_boot=n_boot, seed=seed,
                                  level=level)
        rep["group_names"] = _names(group_names or run["group_names"], run["num_groups"])
        rep["class_names"] = run["class_names"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(rep))
    plot_group_accuracy(rep, out / "group_accuracy.png")
    return rep


def pareto_front(points, higher=(True, True)) -> list[int]:
    """Indices of the points ``(x, y)`` that no other point dominates; ``None``s are never on it."""
    sign = np.array([1.0 if h else -1.0 for h in higher])
    ok = [i for i, p in enumerate(points) if None not in p and all(map(math.isfinite, p))]
    front = []
    for i in ok:
        a = sign * np.array(points[i])
        others = (sign * np.array(points[j]) for j in ok)
        if not any(np.all(b >= a) and np.any(b > a) for b in others):
            front.append(i)
    return front


# Comparison axes that are not scalars of compute_metrics: (higher is better, how to read it).
DERIVED = {"max_group_loss": (False, lambda rep: max(
    [v for v in rep.get("group_loss") or [] if v is not None], default=None))}


def _direction(key: str) -> bool:
    if key in DERIVED:
        return DERIVED[key][0]
    if key not in HIGHER_IS_BETTER:
        raise ValueError(f"no known direction for metric {key!r}; choose one of "
                         f"{sorted({**HIGHER_IS_BETTER, **DERIVED})}")
    return HIGHER_IS_BETTER[key]


def _value(rep: dict, key: str):
    return DERIVED[key][1](rep) if key in DERIVED else rep.get(key)


def _run_metrics(run_dir, split: str) -> dict:
    if isinstance(run_dir, dict):
        return run_dir
    path = Path(run_dir) / "report.json"
    if path.is_file():
        rep = json.loads(path.read_text())
        if rep.get("split") == split:
            return rep
    run = load_run(run_dir, split)
    rep = {"run": run["name"]}
    rep.update(compute_metrics(run["probs"], run["labels"], run["groups"], run["num_groups"],
                               run["num_classes"], losses=run["losses"]))
    return rep


def compare_runs(run_dirs, out_dir, x: str = "accuracy", y: str = "worst_group_accuracy",
                 split: str = "test", labels=None) -> list[dict]:
    """Scatter ``x`` against ``y`` for several runs (a rank or λ sweep) with the Pareto front.

    ``run_dirs``: run directories, or report dicts from :func:`write_report`. Writes
    ``compare.json``, ``compare.md`` and ``pareto.png`` into ``out_dir``. Returns one row per
    run: ``run``, the ``x`` and ``y`` values, their intervals (``<key>_ci``, when the run's
    report has them) and ``pareto`` (on the front, by each metric's better direction).
    """
    hx, hy = _direction(x), _direction(y)
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    rows = []
    for i, d in enumerate(run_dirs):
        rep = _run_metrics(d, split)
        intervals = (rep.get("ci") or {}).get("intervals") or {}
        name = labels[i] if labels else rep.get("run") or Path(str(d)).name
        rows.append({"run": name,
                     x: _value(rep, x), y: _value(rep, y),
                     f"{x}_ci": intervals.get(x), f"{y}_ci": intervals.get(y)})
    front = set(pareto_front([(r[x], r[y]) for r in rows], (hx, hy)))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"x": x, "y": y, "split": split, "runs": rows}, indent=2) + "\n")
    md = [f"| run | {x} {'↑' if hx else '↓'} | {y} {'↑' if hy else '↓'} | Pareto |",
          "|---|---|---|---|"]
    md += [f"| {r['run']} | {_fmt(r[x])} | {_fmt(r[y])} {_fmt_ci(r[f'{y}_ci'])} | "
           f"{'yes' if r['pareto'] else ''} |" for r in rows]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    _plot_pareto(rows, x, y, hx, hy, split, out / "pareto.png")
    return rows


def _plot_pareto(rows, x, y, hx, hy, split, path) -> None:
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    for r in rows:
        if r[x] is None or r[y] is None:
            continue
        err = {}
        for axis, key in (("xerr", x), ("yerr", y)):
            ci = r[f"{key}_ci"]
            if ci is not None:
                err[axis] = [[max(r[key] - ci[0], 0)], [max(ci[1] - r[key], 0)]]
        ax.errorbar(r[x], r[y], fmt="o", ms=5, lw=0.8, capsize=2,
                    color="tab:red" if r["pareto"] else "tab:blue", **err)
        ax.annotate(r["run"], (r[x], r[y]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r[x])
    ax.plot([r[x] for r in front], [r[y] for r in front], "r--", lw=1,
            label="Pareto front (red: on it)")
    ax.set_xlabel(f"{x} ({'higher' if hx else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if hy else 'lower'} is better)")
    ax.set_title(f"{len(rows)} runs, {split} split", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    """``fastfair report RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    p = argparse.ArgumentParser(
        prog="fastfair report",
        description="Fairness report of a run directory (report.json, report.md, "
                    "group_accuracy.png); with several runs, also their accuracy-vs-fairness "
                    "scatter with the Pareto front (compare.json, compare.md, pareto.png).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder: one run's report, or the comparison of "
                                 "several (default: the run directory / ./compare); with "
                                 "several runs, each run's report goes to OUT/<run name>")
    p.add_argument("--split", default="test", help="which predictions_<split>.npz (default test)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--no-ci", action="store_true", help="skip the bootstrap intervals")
    p.add_argument("--x", default="accuracy", help="comparison x axis (default accuracy)")
    p.add_argument("--y", default="worst_group_accuracy", help="comparison y axis")
    args = p.parse_args(argv)
    kw = dict(split=args.split, ci=not args.no_ci, n_boot=args.n_boot, seed=args.seed,
              level=args.level)
    try:
        if len(args.runs) == 1:
            out = args.out or args.runs[0]
            write_report(args.runs[0], out, **kw)
            print(f"wrote {Path(out) / 'report.md'}")
            return 0
        used: dict[str, int] = {}
        reports = []
        for run in args.runs:
            out = None
            if args.out:
                name = Path(run).resolve().name
                used[name] = used.get(name, 0) + 1
                out = Path(args.out) / (name if used[name] == 1 else f"{name}_{used[name]}")
            rep = write_report(run, out, **kw)
            reports.append(rep)
            print(f"{rep['run']}: worst_group_accuracy {_fmt(rep['worst_group_accuracy'])}")
        out = Path(args.out or "compare")
        compare_runs(reports, out, x=args.x, y=args.y, split=args.split)
        print(f"wrote {out / 'compare.md'}")
    except ValueError as e:
        print(f"fastfair report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

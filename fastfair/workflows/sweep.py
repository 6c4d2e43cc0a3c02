"""``fastfair sweep``: FairLoRA's study, a grid over LoRA rank x lambda x penalty x group key x seed.

Every grid point is one training run in ``<sweep dir>/<point name>/``; a point whose
``result.json`` exists is skipped, so a killed sweep resumes where it stopped (a point killed
mid-run restarts from its latest checkpoint, or from scratch without one). Runs with
``lam = 0`` are plain LoRA whatever the penalty and group key, so they run once per
(rank, seed) and serve as the ERM baseline of each rank. The sweep writes ``sweep.csv`` and
``sweep.md`` (one row per run: grid values and every scalar metric on val and test),
``pareto.png`` (accuracy against worst-group accuracy, or ``--x``/``--y``, coloured by rank),
``compare/`` (``fastfair.report.compare_runs`` of all runs) and ``summary.md``:
per penalty/lambda/group key, which rank is best on the chosen bias metric, and whether that
rank is the same everywhere (FairLoRA's finding is that it is not).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig, add_config_arguments, config_from_args
from .common import comma_list
from ..losses import PENALTIES
from ..metrics import HIGHER_IS_BETTER
from ..report import compare_runs, pareto_front

GROUP_KEYS = ("group", "class", "attribute")
# Lower is better; not in HIGHER_IS_BETTER because compute_metrics reports the per-group list
# (fastfair.report reads it the same way).
DERIVED = {"max_group_loss": False}
GRID_KEYS = ("rank", "lam", "penalty", "loss_groups", "seed")


def higher_is_better(metric: str) -> bool:
    """Direction of a scalar metric; ``ValueError`` for one without a known direction."""
    table = {**HIGHER_IS_BETTER, **DERIVED}
    if metric not in table:
        raise ValueError(f"metric {metric!r} has no known direction; choose one of {sorted(table)}")
    return table[metric]


def scalar_metrics(m: dict) -> dict:
    """The scalar entries of a ``compute_metrics`` dict, plus ``max_group_loss``."""
    out = {k: v for k, v in m.items()
           if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    losses = [v for v in m.get("group_loss") or [] if v is not None]
    out["max_group_loss"] = max(losses) if losses else None
    return out


def pareto_plot(points, labels, path, x: str, y: str, title: str, colors=None) -> list[int]:
    """Scatter of ``points`` with their Pareto front drawn; returns the front's indices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points, (higher_is_better(x), higher_is_better(y)))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ok = [i for i, p in enumerate(points) if None not in p]
    sc = ax.scatter([points[i][0] for i in ok], [points[i][1] for i in ok],
                    c=None if colors is None else [colors[i] for i in ok],
                    cmap="viridis" if colors is not None else None, s=36, zorder=2)
    if colors is not None:
        fig.colorbar(sc, ax=ax, label="log2 rank")
    for i in ok:
        ax.annotate(labels[i], points[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
    f = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in f], [points[i][1] for i in f], "r--", lw=1, zorder=1,
            label="Pareto front")
    ax.set_xlabel(f"{x} ({'higher' if higher_is_better(x) else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if higher_is_better(y) else 'lower'} is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front


@dataclass(frozen=True)
class Point:
    rank: int
    lam: float
    penalty: str
    loss_groups: str
    seed: int

    @property
    def name(self) -> str:
        if self.lam == 0:
            return f"r{self.rank}_erm_s{self.seed}"
        return f"r{self.rank}_lam{self.lam:g}_{self.penalty}_{self.loss_groups}_s{self.seed}"


def grid(ranks, lams, penalties, group_keys, seeds) -> list[Point]:
    """The grid's points, ``lam = 0`` collapsed to one ERM run per (rank, seed)."""
    for name, values in (("ranks", ranks), ("lams", lams), ("penalties", penalties),
                         ("group keys", group_keys), ("seeds", seeds)):
        if not values:
            raise ValueError(f"the sweep needs at least one of {name}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank must be an integer >= 1, got {r!r}")
    for lam in lams:
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
    for p in penalties:
        if p not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {p!r}")
    for g in group_keys:
        if g not in GROUP_KEYS:
            raise ValueError(f"group key must be one of {GROUP_KEYS}, got {g!r}")
    points = []
    for r, lam, p, g, s in itertools.product(ranks, lams, penalties, group_keys, seeds):
        pt = Point(r, 0.0, "none", "group", s) if lam == 0 else Point(r, float(lam), p, g, s)
        if pt not in points:
            points.append(pt)
    return points


def point_config(base: TrainConfig, pt: Point, sweep_dir) -> TrainConfig:
    return TrainConfig(**{**base.to_dict(), "finetune": "lora", "rank": pt.rank, "lam": pt.lam,
                          "penalty": pt.penalty, "loss_groups": pt.loss_groups, "seed": pt.seed,
                          "output_dir": str(Path(sweep_dir) / pt.name)}).validate()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d))


def run_point(cfg: TrainConfig, datasets=None, stale: str = "error") -> dict:
    """Train one run unless its ``result.json`` exists; returns that result.

    A run dir holding another config (finished, or a checkpoint to resume) is an error with
    ``stale='error'`` (a sweep whose base config changed) and is deleted with ``'replace'``.
    """
    import yaml
    from accelerate import PartialState

    from ..trainer import latest_checkpoint, train

    state = PartialState()
    out = Path(cfg.output_dir)
    want = _plain(cfg.to_dict())
    result_path, config_path = out / "result.json", out / "config.yaml"
    held = None
    if result_path.is_file():
        held = json.loads(result_path.read_text())["config"]
    elif config_path.is_file():
        held = _plain(yaml.safe_load(config_path.read_text()) or {})
    if held is not None and held != want:
        if stale != "replace":
            diff = sorted(k for k in want if held.get(k) != want[k])
            raise ValueError(f"{out} holds a run with another config (keys {diff}); "
                             "sweep into a new directory")
        held = None
    if held is not None and result_path.is_file():
        return json.loads(result_path.read_text())
    resume = str(out) if held is not None and latest_checkpoint(out) is not None else None
    if resume is None and out.exists():
        # killed before its first checkpoint, or stale: nothing to keep (metrics.jsonl appends)
        if state.is_main_process:
            shutil.rmtree(out)
        state.wait_for_everyone()
    res = train(cfg, resume=resume, datasets=datasets)
    result = {"config": want, "output_dir": str(out),
              "val": scalar_metrics(res["val"]), "test": scalar_metrics(res["test"])}
    if state.is_main_process:
        write_json_atomic(result_path, result)
    state.wait_for_everyone()
    return result


def row_of(pt: Point, result: dict) -> dict:
    row = {"run": pt.name, "rank": pt.rank, "lam": pt.lam, "penalty": pt.penalty,
           "loss_groups": pt.loss_groups if pt.lam else "-", "seed": pt.seed}
    for split in ("val", "test"):
        for k, v in result[split].items():
            row[f"{split}/{k}"] = v
    return row


def write_table(rows: list[dict], sweep_dir: Path, x: str, y: str, metric: str) -> None:
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with (sweep_dir / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    shown = ["accuracy", "worst_group_accuracy", "accuracy_gap", "equalized_odds_difference"]
    shown += [m for m in (x, y, metric) if m not in shown]
    cols = list(GRID_KEYS) + [f"{s}/{m}" for s in ("val", "test") for m in shown]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [("-" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r[c], float) and "/" in c
                  else f"{r[c]:g}" if isinstance(r[c], float) else str(r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict], metric: str = "worst_group_accuracy", split: str = "test") -> str:
    """Per setting (penalty, lambda, group key; ERM is lam = 0): the metric by rank as mean ± std
    over seeds, its change against ERM at the same rank and seed, and the best rank; then
    whether one rank is best in every setting."""
    higher = higher_is_better(metric)
    key = f"{split}/{metric}"
    ranks = sorted({r["rank"] for r in rows})
    erm = {(r["rank"], r["seed"]): r.get(key) for r in rows if r["lam"] == 0}
    settings = sorted({(r["penalty"], r["lam"], r["loss_groups"]) for r in rows},
                      key=lambda s: (s[1], s[0], s[2]))
    head = ["penalty", "lam", "groups"] + [f"rank {k}" for k in ranks] + ["best rank", "margin", "seed std"]
    lines = [f"Which rank is best on {split} {metric} ({'higher' if higher else 'lower'} is better)? "
             "Cells: mean ± std over seeds, and in brackets the mean change against ERM (lam=0) at "
             "the same rank and seed. 'margin' = best minus runner-up mean; 'seed std' = the "
             "largest seed std of those two.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best_ranks = {}
    noisy = []
    for pen, lam, groups in settings:
        mine = [r for r in rows if (r["penalty"], r["lam"], r["loss_groups"]) == (pen, lam, groups)]
        stats, cells = {}, []
        for k in ranks:
            at = [r for r in mine if r["rank"] == k]
            m, s = _mean_std([r.get(key) for r in at])
            if m is None:
                cells.append("-")
                continue
            stats[k] = (m, s)
            cell = f"{m:.4f} ± {s:.4f}"
            if lam:
                d, _ = _mean_std([r[key] - erm[(k, r["seed"])] for r in at
                                  if r.get(key) is not None and erm.get((k, r["seed"])) is not None])
                if d is not None:
                    cell += f" ({d:+.4f})"
            cells.append(cell)
        if not stats:
            continue
        order = sorted(stats, key=lambda k: stats[k][0], reverse=higher)
        best = order[0]
        margin = std = "-"
        if len(order) > 1:
            margin = abs(stats[best][0] - stats[order[1]][0])
            std = max(stats[best][1], stats[order[1]][1])
            if margin == 0:
                best = "tie"
            elif margin <= std:
                noisy.append((pen, lam, groups))
            margin, std = f"{margin:.4f}", f"{std:.4f}"
        best_ranks[(pen, lam, groups)] = best
        lines.append(f"| {pen if lam else 'ERM'} | {lam:g} | {groups} | " + " | ".join(cells)
                     + f" | {best} | {margin} | {std} |")
    lines.append("")
    ties = [k for k, b in best_ranks.items() if b == "tie"]
    distinct = sorted({b for b in best_ranks.values() if b != "tie"})
    if len(ranks) < 2:
        lines.append("Only one rank in the sweep: nothing to compare.")
    elif not distinct:
        lines.append("Every setting is a tie between ranks: the metric does not tell ranks apart here.")
    elif len(best_ranks) - len(ties) < 2:
        lines.append(f"Only one setting tells the ranks apart (best rank {distinct[0]}): whether the "
                     "best rank is universal cannot be read from this sweep.")
    elif len(distinct) == 1:
        lines.append(f"Rank {distinct[0]} is best in every setting without a tie: on this data the "
                     "best rank looks universal.")
    else:
        lines.append(f"The best rank differs between settings ({', '.join(map(str, distinct))}): "
                     "no single rank is best everywhere.")
    if ties:
        lines.append(f"{len(ties)} of {len(best_ranks)} settings tie between their two best ranks.")
    if len({r["seed"] for r in rows}) < 2:
        lines.append("One seed per point: the seed noise is unknown, so no difference above is "
                     "established (run several seeds).")
    elif noisy:
        lines.append(f"In {len(noisy)} of {len(best_ranks)} settings the best rank wins by no more "
                     "than the seed std: there the choice of rank is within seed noise.")
    return "\n".join(lines) + "\n"


def load_rows(sweep_dir) -> list[dict]:
    """The rows of ``sweep.csv`` with numbers parsed back."""
    path = Path(sweep_dir) / "sweep.csv"
    if not path.is_file():
        raise ValueError(f"{path} not found: run the sweep first")
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if k in ("run", "penalty", "loss_groups"):
                    row[k] = v
                elif k in ("rank", "seed"):
                    row[k] = int(v)
                else:
                    row[k] = float(v) if v not in ("", "None") else None
            rows.append(row)
    return rows


def finish_sweep(rows: list[dict], sweep_dir: Path, x: str, y: str, metric: str, split: str) -> str:
    """Tables, plots and summary of the collected rows (main process)."""
    write_table(rows, sweep_dir, x, y, metric)
    points = [(r.get(f"{split}/{x}"), r.get(f"{split}/{y}")) for r in rows]
    labels = [r["run"] for r in rows]
    pareto_plot(points, labels, sweep_dir / "pareto.png", x, y,
                f"FairLoRA sweep, {split} split: colour = log2 rank",
                colors=[math.log2(r["rank"]) for r in rows])
    # the report module's comparison too: its table carries the runs' bootstrap intervals
    compare_runs([str(sweep_dir / r["run"]) for r in rows], str(sweep_dir / "compare"), x=x, y=y,
                 split=split, labels=[r["run"] for r in rows])
    text = summarize(rows, metric, split)
    (sweep_dir / "summary.md").write_text(text)
    return text


def sweep(base: TrainConfig, sweep_dir, ranks=(1, 4, 16, 64), lams=(0.0, 1.0), penalties=("variance",),
          group_keys=("group",), seeds=(0,), x: str = "accuracy", y: str = "worst_group_accuracy",
          metric: str | None = None, split: str = "test", datasets=None) -> list[dict]:
    """Run (or resume) the grid under ``sweep_dir`` and write its tables, plot and summary.

    Returns one row per run. ``datasets`` (``{"train", "val", "test"}``) replaces the config's.
    """
    from accelerate import PartialState

    metric = metric or y
    for m in (x, y, metric):
        higher_is_better(m)
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    sweep_dir = Path(sweep_dir)
    points = grid(list(ranks), list(lams), list(penalties), list(group_keys), list(seeds))
    rows = []
    for i, pt in enumerate(points):
        cfg = point_config(base, pt, sweep_dir)
        if PartialState().is_main_process:
            print(f"fastfair sweep: [{i + 1}/{len(points)}] {pt.name}", flush=True)
        rows.append(row_of(pt, run_point(cfg, datasets=datasets)))
    if PartialState().is_main_process:
        print(finish_sweep(rows, sweep_dir, x, y, metric, split), flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastfair sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML train config every run starts from; flags override it")
    p.add_argument("--ranks", type=comma_list(int), default=[1, 4, 16, 64])
    p.add_argument("--lams", type=comma_list(float), default=[0.0, 1.0], help="lambda values (0 = ERM)")
    p.add_argument("--penalties", type=comma_list(str), default=["variance"], help=f"of {PENALTIES}")
    p.add_argument("--group-keys", type=comma_list(str), default=["group"],
                   help=f"loss group keys, of {GROUP_KEYS}")
    p.add_argument("--seeds", type=comma_list(int), default=[0])
    p.add_argument("--x", default="accuracy", help="Pareto plot x metric")
    p.add_argument("--y", default="worst_group_accuracy", help="Pareto plot y metric")
    p.add_argument("--metric", help="bias metric the summary ranks by (default: --y)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split of plot and summary")
    p.add_argument("--summarize-only", action="store_true",
                   help="re-read sweep.csv of the sweep dir and rewrite plot and summary, no training")
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    # the config's output_dir is the sweep dir; each point gets a directory under it
    sweep_dir = Path(cfg.output_dir if cfg.output_dir != TrainConfig.output_dir else "runs/sweep")
    if args.summarize_only:
        print(finish_sweep(load_rows(sweep_dir), sweep_dir, args.x, args.y, args.metric or args.y, args.split))
        return 0
    # --data-seed (a config key) fixes the split and colors: the data is built once and --seeds
    # vary only initialization and order; without it each run's seed also draws its data
    datasets = None
    if cfg.data_seed is not None:
        from ..trainer import build_datasets_for

        datasets = build_datasets_for(cfg)
    sweep(cfg, sweep_dir, args.ranks, args.lams, args.penalties, args.group_keys, args.seeds,
          x=args.x, y=args.y, metric=args.metric, split=args.split, datasets=datasets)
    return 0

"""fastfair sweep: FairLoRA's study, a grid over method x LoRA rank x lambda x penalty x group key x seed.

Every grid point is one training run in <sweep dir>/<point name>/. A point whose result.json
exists is skipped, so a killed sweep resumes where it stopped (a point killed mid-run restarts
from its latest checkpoint, or from scratch without one). FairLoRA at lambda 0 is plain LoRA
(ERM) whatever the penalty and group key, so it runs once per (rank, seed) and is the baseline
of each rank; --methods adds the group-robustness baselines (groupdro, reweight, jtt, dfr) as a
grid axis. The sweep writes:
  sweep.csv, sweep.md   one row per run: grid values and every scalar metric on val and test
  pareto.png            accuracy against worst-group accuracy (or --x/--y), coloured by rank
  compare/              fastfair report's comparison of all runs, with bootstrap intervals
  summary.md            per setting, the best rank on --metric and whether it is the same
                        everywhere (FairLoRA's finding is that it is not)
  methods.md/.json/.png every setting against ERM, paired by rank and seed
Means are over seeds with the sample std; a difference within the seed spread is a tie.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from .common import (TIE_RULE, Phases, add_shared_arguments, comma_list, derive, fmt_change, fmt_mean_std,
                     mean_std, paired_change, run_point, verdict, workflow_config, workflow_parser,
                     write_json_atomic)

GROUP_KEYS = ("group", "class", "attribute")
METHODS = ("erm", "fairlora", "groupdro", "reweight", "jtt", "dfr")
GRID_KEYS = ("method", "rank", "lam", "penalty", "loss_groups", "seed")
DEFAULT_RANKS = (1, 4, 16, 64)
MAX_LABELS = 12  # points in pareto.png beyond which only the front is labelled


@dataclass(frozen=True)
class Point:
    rank: int
    lam: float
    penalty: str
    loss_groups: str
    seed: int
    method: str = "fairlora"

    @property
    def name(self) -> str:
        if self.method != "fairlora":
            return f"r{self.rank}_{self.method}_s{self.seed}"
        return f"r{self.rank}_lam{self.lam:g}_{self.penalty}_{self.loss_groups}_s{self.seed}"

    @property
    def setting(self) -> str:
        """The method with its fairness settings: one entry of the method comparison."""
        if self.method != "fairlora":
            return self.method
        return f"fairlora λ={self.lam:g} {self.penalty} {self.loss_groups}"


def _check_grid(ranks, lams, penalties, group_keys, seeds, methods) -> None:
    from ..losses import PENALTIES

    for name, values in (("ranks", ranks), ("lams", lams), ("penalties", penalties),
                         ("group keys", group_keys), ("seeds", seeds), ("methods", methods)):
        if not values:
            raise ValueError(f"the sweep needs at least one of {name}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank must be an integer >= 1, got {r!r}")
    for lam in lams:
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
    for values, allowed, what in ((penalties, PENALTIES, "penalty"), (group_keys, GROUP_KEYS, "group key"),
                                  (methods, METHODS, "method")):
        for v in values:
            if v not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {v!r}")


def grid(ranks, lams, penalties, group_keys, seeds, methods=("fairlora",)) -> list[Point]:
    """The grid's points. ``lam = 0`` FairLoRA is ERM, so ERM runs once per (rank, seed) whatever
    the penalty and group key; methods other than FairLoRA take no lambda, penalty or group key."""
    _check_grid(ranks, lams, penalties, group_keys, seeds, methods)
    points = []
    for m, r, lam, p, g, s in itertools.product(methods, ranks, lams, penalties, group_keys, seeds):
        if m == "erm" or (m == "fairlora" and lam == 0):
            pt = Point(r, 0.0, "none", "group", s, "erm")
        elif m == "fairlora":
            pt = Point(r, float(lam), p, g, s)
        else:
            pt = Point(r, 0.0, "none", "group", s, m)
        if pt not in points:
            points.append(pt)
    return points


def point_config(base: TrainConfig, pt: Point, sweep_dir) -> TrainConfig:
    """The run of a point. The grid's FairLoRA keys (lam, penalty, group key) go back to their
    defaults for the other methods, which refuse a key they would ignore."""
    fair = dict(lam=pt.lam, penalty=pt.penalty, loss_groups=pt.loss_groups) if pt.method == "fairlora" else \
        {k: TrainConfig.__dataclass_fields__[k].default for k in ("lam", "penalty", "loss_groups")}
    return derive(base, method=pt.method, finetune="lora", rank=pt.rank, seed=pt.seed,
                  output_dir=str(Path(sweep_dir) / pt.name), **fair)


def run_points(base: TrainConfig, points, sweep_dir, datasets=None, workflow: str = "sweep") -> list[dict]:
    """Train (or reuse) every point under ``sweep_dir``; one row per point."""
    phase = Phases(workflow, len(points))
    rows = []
    for pt in points:
        phase(f"{pt.setting}, rank {pt.rank}, seed {pt.seed}")
        rows.append(row_of(pt, run_point(point_config(base, pt, sweep_dir), datasets=datasets)))
    return rows


def row_of(pt: Point, result: dict) -> dict:
    row = {"run": pt.name, "method": pt.method, "setting": pt.setting, "rank": pt.rank, "lam": pt.lam,
           "penalty": pt.penalty, "loss_groups": pt.loss_groups if pt.lam else "-", "seed": pt.seed}
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


def setting_of(row: dict) -> str:
    """A row's setting; rows written before the method axis have none and are FairLoRA/ERM."""
    if row.get("setting"):
        return row["setting"]
    if not row["lam"]:
        return "erm"
    return f"fairlora λ={row['lam']:g} {row['penalty']} {row['loss_groups']}"


def _rank_cells(mine, ranks, key, erm, is_erm) -> tuple[dict, list[str]]:
    """Per rank: (mean, sample std) over seeds and the cell text, with the mean paired change
    against ERM at the same rank and seed."""
    stats, cells = {}, []
    for k in ranks:
        at = [r for r in mine if r["rank"] == k]
        m, s = mean_std(r.get(key) for r in at)
        if m is None:
            cells.append("-")
            continue
        stats[k] = (m, s)
        cell = fmt_mean_std(m, s, 4)
        if not is_erm:
            d, _ = mean_std(r[key] - erm[(k, r["seed"])] for r in at
                            if r.get(key) is not None and erm.get((k, r["seed"])) is not None)
            if d is not None:
                cell += f" ({d:+.4f})"
        cells.append(cell)
    return stats, cells


def _best_rank(stats: dict, higher: bool):
    """The best rank, or ``"tie"`` when it beats the runner-up by no more than the seed spread
    (the larger sample std of the two); with one seed the spread is unknown and the best stands."""
    order = sorted(stats, key=lambda k: stats[k][0], reverse=higher)
    if len(order) < 2:
        return order[0], "-", "-"
    (m1, s1), (m2, s2) = stats[order[0]], stats[order[1]]
    margin = abs(m1 - m2)
    spread = None if s1 is None or s2 is None else max(s1, s2)
    best = "tie" if margin == 0 or verdict(margin, spread) == "tie" else order[0]
    return best, f"{margin:.4f}", "-" if spread is None else f"{spread:.4f}"


def _rank_verdict(best_ranks: dict, n_ranks: int, n_seeds: int) -> list[str]:
    ties = [k for k, b in best_ranks.items() if b == "tie"]
    distinct = sorted({b for b in best_ranks.values() if b != "tie"})
    if n_ranks < 2:
        lines = ["Only one rank in the sweep: nothing to compare."]
    elif not distinct:
        lines = ["Every setting is a tie between ranks: the metric does not tell ranks apart here."]
    elif len(best_ranks) - len(ties) < 2:
        lines = [f"Only one setting tells the ranks apart (best rank {distinct[0]}): whether the "
                 "best rank is universal cannot be read from this sweep."]
    elif len(distinct) == 1:
        lines = [f"Rank {distinct[0]} is best in every setting without a tie: on this data the "
                 "best rank looks universal."]
    else:
        lines = [f"The best rank differs between settings ({', '.join(map(str, distinct))}): "
                 "no single rank is best everywhere."]
    if ties:
        lines.append(f"{len(ties)} of {len(best_ranks)} settings tie between their two best ranks.")
    if n_seeds < 2:
        lines.append("One seed per point: the seed spread is unknown, so no difference above is "
                     "established (run several seeds).")
    return lines


def summarize(rows: list[dict], metric: str = "worst_group_accuracy", split: str = "test") -> str:
    """Per setting (method, and FairLoRA's penalty, lambda, group key): the metric by rank as
    mean ± sample std over seeds, its change against ERM at the same rank and seed, and the best
    rank (a tie when it wins by no more than the seed spread); then whether one rank is best in
    every setting."""
    from ..metrics import higher_is_better

    higher = higher_is_better(metric)
    key = f"{split}/{metric}"
    ranks = sorted({r["rank"] for r in rows})
    erm = {(r["rank"], r["seed"]): r.get(key) for r in rows if setting_of(r) == "erm"}
    settings = list(dict.fromkeys(setting_of(r) for r in sorted(rows, key=lambda r: (r["lam"], setting_of(r)))))
    head = ["setting"] + [f"rank {k}" for k in ranks] + ["best rank", "margin", "seed std"]
    lines = [f"Which rank is best on {split} {metric} ({'higher' if higher else 'lower'} is better)? "
             "Cells: mean ± sample std over seeds, and in brackets the mean change against ERM at "
             "the same rank and seed. 'margin' = best minus runner-up mean; 'seed std' = the "
             f"larger seed std of those two; {TIE_RULE}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best_ranks = {}
    for setting in settings:
        mine = [r for r in rows if setting_of(r) == setting]
        stats, cells = _rank_cells(mine, ranks, key, erm, setting == "erm")
        if not stats:
            continue
        best, margin, spread = _best_rank(stats, higher)
        best_ranks[setting] = best
        lines.append(f"| {'ERM' if setting == 'erm' else setting} | " + " | ".join(cells)
                     + f" | {best} | {margin} | {spread} |")
    lines += [""] + _rank_verdict(best_ranks, len(ranks), len({r["seed"] for r in rows}))
    return "\n".join(lines) + "\n"


# -- methods side by side ------------------------------------------------------------------------
METHOD_METRICS = ("accuracy", "worst_group_accuracy", "accuracy_gap", "equalized_odds_difference")
PAIRED = ("accuracy", "worst_group_accuracy")
COMPACT = ("accuracy", "worst_group_accuracy")  # what compare_methods prints


def summarize_methods(rows: list[dict], split: str = "test") -> list[dict]:
    """Per (setting, rank): each metric's mean and sample std over seeds, and for accuracy and
    worst-group accuracy the paired change against ERM at the same rank and seed (per seed, mean,
    sample std of the changes and the verdict: a change within that spread is a tie)."""
    from ..metrics import higher_is_better

    rows = [{**r, "setting": setting_of(r)} for r in rows]
    changes = {m: paired_change(rows, "setting", "erm", ("rank",), f"{split}/{m}", higher_is_better(m))
               for m in PAIRED}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["rank"]), []).append(r)
    out = []
    for (setting, rank), sel in sorted(groups.items(), key=lambda kv: (kv[0][0] != "erm", kv[0][1])):
        s = {"setting": setting, "rank": rank, "n_seeds": len(sel), "seeds": [r["seed"] for r in sel]}
        for m in METHOD_METRICS:
            s[m], s[m + "_std"] = mean_std(r.get(f"{split}/{m}") for r in sel)
        for m in PAIRED:
            s[f"vs_erm/{m}"] = changes[m].get((rank, setting))
        out.append(s)
    return out


def methods_table(summary: list[dict], split: str = "test", metrics=METHOD_METRICS, paired=PAIRED) -> str:
    """Markdown: mean ± sample std per metric, n seeds, and the paired change against ERM."""
    ranks = {s["rank"] for s in summary}
    head = ["method"] + (["rank"] if len(ranks) > 1 else []) + ["n seeds"] + list(metrics) + \
        [f"Δ {m} vs ERM" for m in paired]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["setting"]] + ([str(s["rank"])] if len(ranks) > 1 else []) + [str(s["n_seeds"])]
        cells += [fmt_mean_std(s[m], s[m + "_std"]) for m in metrics]
        cells += [fmt_change(s[f"vs_erm/{m}"]) for m in paired]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({n for s in summary for n in s["seeds"]})
    note = (f"{split} split, seeds {seeds}: mean ± sample std over seeds. Δ: the change against ERM at the "
            f"same rank and seed, mean ± sample std of those paired changes; {TIE_RULE}.")
    if len(seeds) < 2:
        note += " One seed: the spread is unknown, so no difference is established."
    return note + "\n\n" + "\n".join(lines) + "\n"


def methods_plot(summary: list[dict], path, split: str = "test") -> None:
    """Worst-group against mean accuracy, one colour per method (labelled by its name, or by its
    ranks when there are several), whiskers of the sample std over seeds where there are several."""
    from ..report import pareto_plot

    multi_rank = len({s["rank"] for s in summary}) > 1
    pareto_plot(path, [(s["accuracy"], s["worst_group_accuracy"]) for s in summary],
                "accuracy", "worst_group_accuracy",
                errors=[(s["accuracy_std"], s["worst_group_accuracy_std"]) for s in summary],
                n_seeds=[s["n_seeds"] for s in summary], error_label="± sample std",
                # named beside the point too, so methods that land on the same point both show
                labels=[f"r{s['rank']}" if multi_rank else s["setting"] for s in summary],
                color_by=[s["setting"] for s in summary], color_name="",
                title=f"Methods side by side, {split} split (means over seeds)")


def write_method_comparison(rows: list[dict], out_dir: Path, split: str = "test") -> dict:
    """``methods.md``, ``methods.json`` and ``methods.png`` under ``out_dir``; returns the summary
    and the table."""
    summary = summarize_methods(rows, split)
    table = methods_table(summary, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "methods.md").write_text(table)
    write_json_atomic(out_dir / "methods.json", {"split": split, "summary": summary, "rows": rows})
    methods_plot(summary, out_dir / "methods.png", split)
    return {"summary": summary, "table": table}


def compare_methods(base_cfg: TrainConfig, methods, seeds, out_dir, datasets=None, backbone_weights=None,
                    split: str = "test") -> dict:
    """Each method at the base config over ``seeds``, side by side (ERM is added when missing:
    every method is compared with it, seed by seed). FairLoRA takes the config's lambda (1 when
    it is 0). Runs resume like the sweep's. Writes ``methods.{md,json,png}`` under ``out_dir``,
    prints the table and returns ``{"rows", "summary", "table", "out_dir"}``."""
    from accelerate import PartialState

    methods = list(dict.fromkeys(["erm", *methods]))
    base = derive(base_cfg, checkpoint=str(backbone_weights)) if backbone_weights is not None else base_cfg
    out_dir = Path(out_dir)
    points = grid([base.rank], [base.lam or 1.0], [base.penalty], [base.loss_groups], list(seeds), methods)
    rows = run_points(base, points, out_dir, datasets, workflow="methods")
    result = {"rows": rows, "summary": None, "table": None, "out_dir": str(out_dir)}
    if PartialState().is_main_process:
        result.update(write_method_comparison(rows, out_dir, split))
        compact = methods_table(result["summary"], split, COMPACT, ("worst_group_accuracy",))
        print(f"\n{compact}\nfull table: {out_dir / 'methods.md'}, plot: {out_dir / 'methods.png'}", flush=True)
    return result


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
                if k in ("run", "method", "setting", "penalty", "loss_groups"):
                    row[k] = v
                elif k in ("rank", "seed"):
                    row[k] = int(v)
                else:
                    row[k] = float(v) if v not in ("", "None") else None
            rows.append(row)
    return rows


def point_label(row: dict, with_seed: bool) -> str:
    """A short plot label (the colour gives the rank): ``ERM``, ``λ=1 variance group``, ``jtt``."""
    setting = setting_of(row)
    text = "ERM" if setting == "erm" else setting.removeprefix("fairlora ")
    return f"{text} s{row['seed']}" if with_seed else text


def finish_sweep(rows: list[dict], sweep_dir: Path, x: str, y: str, metric: str, split: str) -> str:
    """Tables, plots and summary of the collected rows (main process); with several methods also
    their side-by-side comparison (``methods.{md,json,png}``)."""
    from ..metrics import higher_is_better
    from ..report import compare_runs, pareto_front, pareto_plot

    write_table(rows, sweep_dir, x, y, metric)
    several = len({r["seed"] for r in rows}) > 1
    points = [(r.get(f"{split}/{x}"), r.get(f"{split}/{y}")) for r in rows]
    labels = [point_label(r, several) for r in rows]
    if len(rows) > MAX_LABELS:  # a label per point would bury them: the front's only, the colour tells the rank
        front = set(pareto_front(points, (higher_is_better(x), higher_is_better(y))))
        labels = [t if i in front else "" for i, t in enumerate(labels)]
    pareto_plot(sweep_dir / "pareto.png", points, x, y, labels=labels, color_by=[r["rank"] for r in rows],
                color_name="rank", title=f"FairLoRA sweep, {split} split" +
                (" (labels on the Pareto front)" if len(rows) > MAX_LABELS else ""))
    # the report module's comparison too: its table carries the runs' bootstrap intervals
    compare_runs([str(sweep_dir / r["run"]) for r in rows], str(sweep_dir / "compare"), x=x, y=y,
                 split=split, labels=[r["run"] for r in rows])
    text = summarize(rows, metric, split)
    (sweep_dir / "summary.md").write_text(text)
    # every setting against ERM, paired by rank and seed (when both ran); printed when methods
    # beyond FairLoRA ran
    settings = {setting_of(r) for r in rows}
    if "erm" in settings and len(settings) > 1:
        table = write_method_comparison(rows, sweep_dir, split)["table"]
        if {r.get("method") for r in rows} - {"erm", "fairlora", None}:
            text += "\nMethods side by side (methods.md, methods.png):\n\n" + table
    return text


def sweep(base: TrainConfig, sweep_dir, ranks=DEFAULT_RANKS, lams=(0.0, 1.0), penalties=("variance",),
          group_keys=("group",), seeds=(0,), x: str = "accuracy", y: str = "worst_group_accuracy",
          metric: str | None = None, split: str = "test", datasets=None, methods=("fairlora",)) -> list[dict]:
    """Run (or resume) the grid under ``sweep_dir`` and write its tables, plots and summary.

    Returns one row per run. ``datasets`` (``{"train", "val", "test"}``) replaces the config's.
    ``methods``: a grid axis (``METHODS``); FairLoRA at lambda 0 is ERM.
    """
    from accelerate import PartialState

    from ..metrics import higher_is_better

    metric = metric or y
    for m in (x, y, metric):
        higher_is_better(m)
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    sweep_dir = Path(sweep_dir)
    points = grid(list(ranks), list(lams), list(penalties), list(group_keys), list(seeds), list(methods))
    rows = run_points(base, points, sweep_dir, datasets)
    if PartialState().is_main_process:
        print(finish_sweep(rows, sweep_dir, x, y, metric, split), flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p, g = workflow_parser("sweep", __doc__, "fastfair sweep --backbone pretrain --methods "
                           "erm,fairlora,groupdro,reweight,jtt,dfr --seeds 0,1,2 (the docs' set-up, methods "
                           "side by side)", "YAML train config every run starts from; flags override it")
    g.add_argument("--ranks", type=comma_list(int), default=None,
                   help="LoRA ranks (default: 1,4,16,64; with --methods, the config's --rank)")
    g.add_argument("--lams", type=comma_list(float), default=[0.0, 1.0],
                   help="FairLoRA lambda values, 0 = ERM (default: %(default)s)")
    g.add_argument("--penalties", type=comma_list(str), default=["variance"],
                   help="FairLoRA penalties, of --penalty's choices (default: %(default)s)")
    g.add_argument("--group-keys", type=comma_list(str), default=["group"],
                   help=f"loss group keys, of {GROUP_KEYS} (default: %(default)s)")
    g.add_argument("--methods", type=comma_list(str), default=None,
                   help=f"methods side by side, of {METHODS}; adds methods.md/png with each method's "
                        "paired change against ERM (default: fairlora, i.e. the lams above)")
    g.add_argument("--seeds", type=comma_list(int), default=[0], help="seeds (default: %(default)s)")
    g.add_argument("--x", default="accuracy", help="Pareto plot x metric (default: %(default)s)")
    g.add_argument("--y", default="worst_group_accuracy", help="Pareto plot y metric (default: %(default)s)")
    g.add_argument("--metric", help="bias metric the summary ranks by (default: --y)")
    g.add_argument("--split", default="test", choices=("val", "test"),
                   help="split of plots and summary (default: %(default)s)")
    g.add_argument("--summarize-only", action="store_true",
                   help="re-read sweep.csv of the sweep dir and rewrite plots and summary, no training")
    add_shared_arguments(p, g)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize_only:  # reads the finished runs: nothing to pre-train
        args.backbone = "config"
    cfg = workflow_config(args)
    # the config's output_dir is the sweep dir; each point gets a directory under it
    sweep_dir = Path(cfg.output_dir if cfg.output_dir != TrainConfig.output_dir else "runs/sweep")
    if args.summarize_only:
        print(finish_sweep(load_rows(sweep_dir), sweep_dir, args.x, args.y, args.metric or args.y, args.split))
        return 0
    ranks = args.ranks or ([cfg.rank] if args.methods else list(DEFAULT_RANKS))
    # --data-seed (a config key) fixes the split and colors: the data is built once and --seeds
    # vary only initialization and order; without it each run's seed also draws its data
    datasets = None
    if cfg.data_seed is not None:
        from ..trainer import build_datasets_for

        datasets = build_datasets_for(cfg)
    sweep(cfg, sweep_dir, ranks, args.lams, args.penalties, args.group_keys, args.seeds,
          x=args.x, y=args.y, metric=args.metric, split=args.split, datasets=datasets,
          methods=args.methods or ("fairlora",))
    return 0

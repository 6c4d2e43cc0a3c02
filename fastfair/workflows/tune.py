"""fastfair tune: FairTune, choose what to fine-tune by validation fairness (optuna).

Stage one is an optuna study. A trial picks, for each transformer block, what is trained:
frozen, LoRA on the attention (attn: qkv, proj), on the MLP (mlp: fc1, fc2) or on both, with a
rank per block; with --allow-full also full fine-tuning of the block's attention, MLP,
LayerNorms or the whole block, as FairTune's mask did. It also picks the learning rate,
log-uniform in --lr-range. The head is always trained. A trial is one training run scored on
the validation split, on pooled predictions: worst-group accuracy by default, or another
metric, or two at once (NSGA-II, Pareto front). Single-objective studies report the validation
metric every epoch and prune with optuna's median rule. The study lives in <out>/study.db
(SQLite): run the same command again and it resumes, counting finished (complete or pruned)
trials against --n-trials; a trial left running by a killed process is marked failed.

Stage two retrains the best configuration from scratch (--final-epochs) and reports on the
test split. Output under --output-dir (default runs/tune):
  summary.md         best trial, optuna's parameter importance, the test comparison with the
                     base config and with the base config at the tuned learning rate
                     (--compare-baseline: baseline/, baseline_tuned_lr/)
  study.png          optimization history (one objective) or the trials' Pareto front (two)
  best_config.yaml   for fastfair train --config
  trials.csv         every trial; trials/trial_NNNN/ its run; best/ the stage-two run
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from ..config import TrainConfig
from .common import (Phases, add_shared_arguments, comma_list, derive, fmt_mean_std, run_config, run_point,
                     workflow_config, workflow_parser)

LORA_CHOICES = ("frozen", "attn", "mlp", "both")
FULL_CHOICES = ("full_attn", "full_mlp", "full_norm", "full_block")
# Linear layers that LoRA wraps, and modules trained fully, per choice (names inside a block).
LORA_PARTS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2"),
              "both": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
FULL_PARTS = {"full_attn": ("attn",), "full_mlp": ("mlp",), "full_norm": ("norm1", "norm2"),
              "full_block": ("",)}
STUDY_NAME = "fastfair-tune"


def vit_depth(cfg: TrainConfig, num_classes: int) -> int:
    """Number of transformer blocks of the config's model, built on the meta device (no memory,
    no download), after checking that every block has the modules a trial can choose."""
    import torch

    from ..models import create_backbone

    probe = derive(cfg, pretrained=False, checkpoint=None)
    with torch.device("meta"):
        model = create_backbone(probe, num_classes=num_classes)
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"fastfair tune needs a timm ViT with 'blocks'; {cfg.model} has none")
    names = {n for n, _ in model.named_modules()}
    for i in range(len(blocks)):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn", "mlp", "norm1", "norm2"):
            if f"blocks.{i}.{part}" not in names:
                raise ValueError(f"{cfg.model}: block {i} has no module '{part}'; fastfair tune "
                                 "searches over timm ViT blocks (attn.qkv/proj, mlp.fc1/fc2, norm1/2)")
    return len(blocks)


def block_choices(allow_full: bool) -> tuple[str, ...]:
    return LORA_CHOICES + (FULL_CHOICES if allow_full else ())


def suggest_params(trial, depth: int, ranks=(2, 4, 8, 16), allow_full: bool = False,
                   lr_range=(1e-5, 1e-2)) -> dict:
    """Sample one configuration: ``block{i}``, ``rank{i}`` (LoRA blocks only) and ``lr``."""
    params = {}
    for i in range(depth):
        mode = trial.suggest_categorical(f"block{i}", block_choices(allow_full))
        params[f"block{i}"] = mode
        if mode in LORA_PARTS:
            params[f"rank{i}"] = trial.suggest_categorical(f"rank{i}", list(ranks))
    params["lr"] = trial.suggest_float("lr", lr_range[0], lr_range[1], log=True)
    return params


def trial_config(base: TrainConfig, params: dict, depth: int, output_dir) -> TrainConfig:
    """The train config of a trial: LoRA targets and ranks as full module names, fully trained
    modules added to ``trainable`` (the head stays there), and the learning rate.

    Without any LoRA block the run is ``finetune='linear'``, which trains exactly ``trainable``.
    """
    targets, rank_pattern, trainable = [], {}, list(base.trainable or ("head",))
    if not trainable:
        raise ValueError("the base config's trainable list is empty: the head must be trained")
    for i in range(depth):
        mode = params.get(f"block{i}")
        if mode in LORA_PARTS:
            rank = params.get(f"rank{i}")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"block {i} uses LoRA but rank{i} is {rank!r}")
            for part in LORA_PARTS[mode]:
                targets.append(f"blocks.{i}.{part}")
                rank_pattern[f"blocks.{i}.{part}"] = rank
        elif mode in FULL_PARTS:
            trainable += [f"blocks.{i}" + (f".{p}" if p else "") for p in FULL_PARTS[mode]]
        elif mode != "frozen":
            raise ValueError(f"block{i} must be one of {LORA_CHOICES + FULL_CHOICES}, got {mode!r}")
    extra = sorted(set(params) - {f"block{i}" for i in range(depth)} - {f"rank{i}" for i in range(depth)} - {"lr"})
    if extra:
        raise ValueError(f"unknown trial parameter(s) {extra} for a model of depth {depth}")
    if "lr" not in params:
        raise ValueError("trial parameters lack 'lr'")
    changes = dict(targets=targets, rank_pattern=rank_pattern, exclude=[], trainable=trainable,
                   lr=float(params["lr"]), output_dir=str(output_dir), finetune="lora" if targets else "linear")
    if rank_pattern:
        changes["rank"] = max(rank_pattern.values())
    return derive(base, **changes)


def describe(params: dict, depth: int) -> str:
    """One short line for a trial: each block's choice (with its rank) and the learning rate."""
    blocks = []
    for i in range(depth):
        mode = params.get(f"block{i}")
        blocks.append(f"{mode}:{params[f'rank{i}']}" if f"rank{i}" in params else str(mode))
    return f"blocks [{' '.join(blocks)}], lr {params['lr']:.2g}"


def objective_value(val_metrics: dict, name: str) -> float:
    """The objective read from a metrics dict (``nan`` where undefined: optuna fails the trial)."""
    from ..metrics import scalar_metrics

    v = scalar_metrics(val_metrics).get(name)
    return float("nan") if v is None else float(v)


def directions(objectives) -> list[str]:
    from ..metrics import higher_is_better

    return ["maximize" if higher_is_better(o) else "minimize" for o in objectives]


def _broadcast(obj):
    """``obj`` of the main process on every process (identity with one process)."""
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def open_study(out: Path, objectives, sampler_seed: int, population_size: int, pruner, search: dict):
    """Create or load the study in ``out/study.db`` and fail trials a killed run left RUNNING."""
    import optuna
    from optuna.trial import TrialState

    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name=STUDY_NAME,
                                directions=directions(objectives), load_if_exists=True, pruner=pruner)
    settings = {"objectives": list(objectives), **search}
    if study.user_attrs.get("settings") is None:
        study.set_user_attr("settings", settings)
    elif study.user_attrs["settings"] != settings:
        raise ValueError(f"{out / 'study.db'} holds a study with settings {study.user_attrs['settings']}, "
                         f"not {settings}: tune into a new directory")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    # Reseeded by progress, so a resumed study does not replay the random start of the first run.
    seed = sampler_seed * 100_003 + len(study.trials)
    if len(objectives) > 1:
        study.sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    else:
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study


def done_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def run_trials(base: TrainConfig, out: Path, n_trials: int, objectives, depth: int, datasets,
               ranks, allow_full: bool, lr_range, pruner, population_size: int):
    """Stage one: run trials until ``n_trials`` are complete or pruned. Only the main process
    opens the study; the others receive each trial's parameters and pruning decisions."""
    from accelerate import PartialState
    from optuna.trial import TrialState

    from .. import metrics

    main = PartialState().is_main_process
    multi = len(objectives) > 1
    search = {"ranks": list(ranks), "allow_full": bool(allow_full), "lr_range": [float(v) for v in lr_range],
              "depth": depth}
    study = open_study(out, objectives, base.seed, population_size, pruner, search) if main else None
    remaining = _broadcast(max(n_trials - len(done_trials(study)), 0) if main else None)
    phase = Phases("tune", remaining)
    for _ in range(remaining):
        trial = study.ask() if main else None
        number, params = _broadcast((trial.number, suggest_params(trial, depth, ranks, allow_full, lr_range))
                                    if main else None)
        cfg = trial_config(base, params, depth, out / "trials" / f"trial_{number:04d}")
        pruned = False

        def on_epoch_end(epoch, val):
            nonlocal pruned
            if multi:  # optuna prunes single-objective studies only
                return False
            stop = None
            if main:
                v = objective_value(val, objectives[0])
                if math.isfinite(v):
                    trial.report(v, epoch)
                stop = trial.should_prune()
            pruned = bool(_broadcast(stop))
            return pruned

        phase(f"trial #{number}: {describe(params, depth)}")
        try:
            res = run_config(cfg, datasets=datasets, on_epoch_end=on_epoch_end)
        except BaseException:
            if main:  # not counted as done: a resumed study runs another trial in its place
                study.tell(trial, state=TrialState.FAIL)
            raise
        if not main:
            continue
        trial.set_user_attr("output_dir", res["output_dir"])
        for k, v in metrics.scalar_metrics(res["val"]).items():
            trial.set_user_attr(f"val/{k}", v)
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            values = [objective_value(res["val"], o) for o in objectives]
            study.tell(trial, values if multi else values[0])
    return study


def best_trial(study, objectives):
    """The best complete trial; with two objectives, the Pareto trial best on the second
    (fairness) objective, ties broken by the first."""
    if len(objectives) == 1:
        return study.best_trial
    front = study.best_trials
    if not front:
        raise ValueError("no complete trial: nothing to retrain")
    signs = [1 if d == "maximize" else -1 for d in directions(objectives)]
    return max(front, key=lambda t: (signs[1] * t.values[1], signs[0] * t.values[0]))


def write_trials(study, objectives, path: Path) -> list[dict]:
    rows = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name}
        for i, o in enumerate(objectives):
            row[o] = t.values[i] if t.values else None
        row["duration_s"] = round(t.duration.total_seconds(), 2) if t.duration else None
        row.update({f"param/{k}": v for k, v in t.params.items()})
        row.update({k: v for k, v in t.user_attrs.items()})
        rows.append(row)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return rows


def _check_tune_args(objectives, n_trials, ranks, lr_range, pruner):
    """Validated objectives, lr range and pruner object; errors name the bad value."""
    import optuna

    from ..metrics import higher_is_better

    objectives = list(objectives)
    if not 1 <= len(objectives) <= 2:
        raise ValueError(f"one or two objectives, got {objectives}")
    for o in objectives:
        higher_is_better(o)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks must be integers >= 1, got {r!r}")
    lo, hi = (float(v) for v in lr_range)
    if not 0 < lo < hi:
        raise ValueError(f"lr range must satisfy 0 < low < high, got {lr_range!r}")
    if isinstance(pruner, str):
        if pruner not in ("median", "none"):
            raise ValueError(f"pruner must be 'median' or 'none', got {pruner!r}")
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
                  if pruner == "median" else optuna.pruners.NopPruner())
    return objectives, (lo, hi), pruner


def importances(study, objectives) -> dict | None:
    """optuna's parameter importance (its default evaluator) of the complete trials for the
    fairness objective (the last); ``None`` with fewer than two complete trials or parameters
    that never varied."""
    import warnings

    import optuna

    from ..metrics import higher_is_better

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    target = None
    if len(objectives) > 1:  # a target is read as lower-is-better
        sign = -1.0 if higher_is_better(objectives[-1]) else 1.0
        target = lambda t: sign * t.values[-1]  # noqa: E731
    with warnings.catch_warnings():  # "few trials per regime": summary.md says they are rough
        warnings.filterwarnings("ignore", category=UserWarning, module=r"optuna\.importance")
        try:
            return optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError):  # e.g. every trial drew the same values
            return None


def plot_study(study, objectives, out: Path) -> Path:
    """``study.png``: optuna's optimization history (one objective), or the trials' Pareto front."""
    import optuna

    from ..metrics import axis_label
    from ..report import pareto_plot

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    path = out / "study.png"
    if len(objectives) == 2:
        pareto_plot(path, [tuple(t.values) for t in complete], objectives[0], objectives[1],
                    labels=[f"#{t.number}" for t in complete], title="FairTune trials on the validation split")
        return path
    import warnings

    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # optuna's plots switch the global style to ggplot; rc_context gives it back afterwards, so
    # the plots drawn after this one in the same process keep theirs
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=objectives[0])
        fig = ax.figure
        fig.set_size_inches(6.4, 4.2)
        ax.set_title(f"FairTune study, validation split\n{axis_label(objectives[0])}", fontsize=9)
        ax.set_ylabel(f"validation {objectives[0]}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return path


def summary_markdown(study, objectives, best, result: dict) -> str:
    """``summary.md``: the best trial, parameter importance and the test comparison of stage two."""
    counts = {}
    for t in study.trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    lines = ["# FairTune study", "",
             f"Trials: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}. Objective(s) on the "
             f"validation split: {', '.join(objectives)}.", "",
             f"## Best trial: #{best.number}", "", "| | value |", "|---|---|"]
    lines += [f"| validation {o} | {v:.4f} |" for o, v in zip(objectives, best.values)]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in best.params.items()]
    imp = importances(study, objectives)
    lines += ["", f"## Parameter importance (optuna, for {objectives[-1]})", ""]
    if imp is None:
        lines.append("Not computed: fewer than two complete trials, or no parameter varied.")
    else:
        lines += ["| parameter | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in imp.items()]
        lines.append(f"\nOn {sum(1 for t in study.trials if t.values)} trials: with few trials "
                     "these are rough, and they say what moved the objective, not by how much.")
    lines += ["", "## Stage two (test split, one seed)", ""]
    lines += [baseline_table(result["final"], {k: result[k] for k in COMPARISONS})] if result["final"] else \
        ["Not run (--no-retrain)."]
    return "\n".join(lines) + "\n"


COMPARISONS = {"baseline": "base config (baseline/)", "baseline_tuned_lr": "base config at the tuned lr "
                "(baseline_tuned_lr/)"}


def baseline_table(final: dict, baselines: dict, split: str = "test") -> str:
    """Test metrics of the tuned run beside each comparison run's (``COMPARISONS`` keys; those
    not run are None) and the differences."""
    from ..metrics import summary_keys

    runs = {k: v for k, v in baselines.items() if v}
    head = "| metric | tuned (best/) |" + "".join(f" {COMPARISONS[k]} | tuned − it |" for k in runs)
    lines = [head, "|---|---|" + "---|---|" * len(runs)]
    for key in summary_keys():
        v = final[split].get(key)
        cells = [fmt_mean_std(v, None, 4)]
        for run in runs.values():
            b = run[split].get(key)
            cells += [fmt_mean_std(b, None, 4), "n/a" if v is None or b is None else f"{v - b:+.4f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if runs:
        lines.append("\nOne seed each: the seed spread is unknown, so the difference is not established; "
                     "repeat with other --seed values before reading it as an effect.")
    return "\n".join(lines)


def tune(base: TrainConfig, out, n_trials: int = 20, objectives=("worst_group_accuracy",),
         ranks=(2, 4, 8, 16), allow_full: bool = False, lr_range=(1e-5, 1e-2), pruner="median",
         population_size: int = 10, final_epochs: int | None = None, retrain: bool = True,
         compare_baseline: bool = False, datasets=None) -> dict:
    """Run (or resume) the study, then retrain the best configuration and report on test.

    Returns ``{"best_params", "best_values", "best_config", "final", "baseline",
    "baseline_tuned_lr"}`` (the last three: ``run_point`` results with val/test scalars; ``None``
    when not run).
    ``pruner``: ``"median"``, ``"none"`` or an optuna pruner. Writes ``trials.csv``,
    ``study.png``, ``best_config.yaml`` and ``summary.md`` under ``out``.
    """
    import optuna
    from accelerate import PartialState

    from ..trainer import build_datasets_for

    objectives, (lo, hi), pruner = _check_tune_args(objectives, n_trials, ranks, lr_range, pruner)
    out = Path(out)
    main = PartialState().is_main_process
    base.validate()
    if datasets is None:
        datasets = build_datasets_for(base)
    depth = vit_depth(base, datasets["train"].num_classes)
    study = run_trials(base, out, n_trials, objectives, depth, datasets, ranks, allow_full, (lo, hi),
                       pruner, population_size)
    result = {"best_params": None, "best_values": None, "best_config": None, "final": None, "baseline": None,
              "baseline_tuned_lr": None}
    best = None
    if main:
        write_trials(study, objectives, out / "trials.csv")
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            raise ValueError(f"no trial of {out / 'study.db'} completed (all pruned or failed)")
        plot_study(study, objectives, out)
        best = best_trial(study, objectives)
        result["best_params"], result["best_values"] = dict(best.params), list(best.values)
    result["best_params"] = _broadcast(result["best_params"])
    final_cfg = trial_config(base, result["best_params"], depth, out / "best")
    if final_epochs is not None:
        final_cfg = derive(final_cfg, epochs=final_epochs)
    if main:
        final_cfg.save(out / "best_config.yaml")
        print(f"fastfair tune: best trial #{best.number} {result['best_params']} values {result['best_values']}; "
              f"config in {out / 'best_config.yaml'}", flush=True)
    result["best_config"] = final_cfg
    if retrain:
        result["final"] = run_point(final_cfg, datasets=datasets, stale="replace")
        if compare_baseline:
            base_cfg = derive(base, output_dir=str(out / "baseline"), epochs=final_cfg.epochs)
            result["baseline"] = run_point(base_cfg, datasets=datasets, stale="replace")
            # the study tunes the learning rate too: the base config at the tuned rate tells the
            # choice of parameters apart from the choice of rate
            lr_cfg = derive(base_cfg, output_dir=str(out / "baseline_tuned_lr"), lr=final_cfg.lr)
            result["baseline_tuned_lr"] = run_point(lr_cfg, datasets=datasets, stale="replace")
    if main:
        (out / "summary.md").write_text(summary_markdown(study, objectives, best, result))
        if result["final"]:
            table = baseline_table(result["final"], {k: result[k] for k in COMPARISONS})
            print(f"\nfastfair tune: stage two, test split\n\n{table}",
                  flush=True)
        print(f"fastfair tune: summary in {out / 'summary.md'}, plot in {out / 'study.png'}", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p, g = workflow_parser("tune", __doc__, "fastfair tune --backbone pretrain --n-trials 20 (the docs' set-up)",
                           "YAML train config the trials start from; flags override it")
    g.add_argument("--n-trials", type=int, default=20,
                   help="finished trials wanted; a resumed study counts its earlier ones (default: %(default)s)")
    g.add_argument("--objective", type=comma_list(str), default=["worst_group_accuracy"],
                   help="validation objective: a metric of fastfair.metrics.METRICS (those marked objective "
                        "are suggested: worst_group_accuracy, accuracy_gap, worst_group_auc, ...); two "
                        "comma-separated names run NSGA-II, e.g. accuracy,worst_group_accuracy "
                        "(default: worst_group_accuracy)")
    g.add_argument("--ranks", type=comma_list(int), default=[2, 4, 8, 16],
                   help="LoRA ranks a block may take (default: 2,4,8,16)")
    g.add_argument("--allow-full", action="store_true",
                   help="blocks may also fully fine-tune their attention, MLP, norms or everything")
    g.add_argument("--lr-range", type=comma_list(float), default=[1e-5, 1e-2],
                   help="log-uniform learning-rate range (default: 1e-5,1e-2; FairTune: 1e-5,1e-3)")
    g.add_argument("--pruner", default="median", choices=("median", "none"),
                   help="optuna pruner of single-objective studies (default: %(default)s)")
    g.add_argument("--population-size", type=int, default=10,
                   help="NSGA-II population, two objectives only (default: %(default)s)")
    g.add_argument("--final-epochs", type=int, help="epochs of the stage-two retraining (default: the config's)")
    g.add_argument("--no-retrain", action="store_true", help="stop after stage one and best_config.yaml")
    g.add_argument("--compare-baseline", action="store_true",
                   help="also train the base config, and the base config at the tuned learning rate, in "
                        "stage two and compare them on test in summary.md")
    add_shared_arguments(p, g)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.lr_range) != 2:
        raise SystemExit(f"--lr-range takes two numbers, got {args.lr_range}")
    cfg = workflow_config(args)
    out = Path(cfg.output_dir if cfg.output_dir != TrainConfig.output_dir else "runs/tune")
    tune(cfg, out, n_trials=args.n_trials, objectives=args.objective, ranks=args.ranks,
         allow_full=args.allow_full, lr_range=args.lr_range, pruner=args.pruner,
         population_size=args.population_size, final_epochs=args.final_epochs,
         retrain=not args.no_retrain, compare_baseline=args.compare_baseline)
    return 0

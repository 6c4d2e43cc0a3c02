"""fastfair bias-transfer: does a source model's trigger bias survive transfer? (Salman et al., 2022)

A source model is trained from scratch on a source task in which a trigger (a yellow patch in a
corner, or a faint fixed pattern) is added with probability p to the images of one source
class, so it learns "trigger => that class"; a control source is trained the same way without
the trigger. Each source is transferred to a target task by linear probe, LoRA at several ranks,
FairLoRA and full fine-tuning; a model trained from scratch on the target is the reference.
Optionally the target is "de-biased": the trigger is added to a fraction of its training
images across all classes, so the target data says the trigger means nothing.

Metric, on the clean target test images x and the same images with the trigger T(x):
ASR = Pr[pred(T(x)) != y | pred(x) = y], and the flip rate toward the target class that
the source's trigger class maps to, Pr[pred(T(x)) = t | pred(x) = y, y != t].

Embedded benchmark: the training digits are halved, disjointly, by source image; the source task
is 10-class digits with uniform colors on one half, the target task binary digit < 5 (or
10-class digits, --target-task digits) with uniform colors on the other half, validated and
tested on the benchmark's own val/test splits (never seen by the source). With the trigger on
digit c the flip class is int(c < 5) (binary) or c (digits).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import TrainConfig
from .common import (TIE_RULE, Phases, add_shared_arguments, build_model, comma_list, datasets_for,
                     derive, fmt_change, fmt_mean_std, half_split, paired_change, predict, print_results,
                     run_config,
                     seed_bars, stack_images, summarize_seeds, workflow_config, workflow_parser, write_rows)

MODES = ("linear", "lora", "fairlora", "full", "scratch")
DEFAULT_MODES = "linear,lora:1,lora:4,lora:16,fairlora:4,full,scratch"


# -- the metric ------------------------------------------------------------------------------
def attack_success_rate(pred_clean, pred_triggered, labels, target_class: int | None = None) -> dict:
    """ASR and flip rate from predictions on clean and triggered copies of the same images.

    ``asr = Pr[pred_triggered != y | pred_clean == y]``; ``flip_rate = Pr[pred_triggered ==
    target_class | pred_clean == y, y != target_class]`` (None without ``target_class``). A rate
    whose conditioning set is empty (no correctly classified clean image) is None, with a note.
    """
    import torch

    pc, pt, y = (torch.as_tensor(a).long().flatten() for a in (pred_clean, pred_triggered, labels))
    if not (len(pc) == len(pt) == len(y)):
        raise ValueError(f"pred_clean, pred_triggered and labels differ in length: "
                         f"{len(pc)}, {len(pt)}, {len(y)}")
    correct = pc == y
    out = {"n": len(y), "n_correct": int(correct.sum()), "asr": None, "flip_rate": None,
           "n_flip_eligible": 0, "note": ""}
    notes = []
    if out["n_correct"]:
        out["asr"] = float((pt[correct] != y[correct]).float().mean())
    else:
        notes.append("ASR undefined: no clean image is classified correctly")
    if target_class is not None:
        eligible = correct & (y != int(target_class))
        out["n_flip_eligible"] = int(eligible.sum())
        if out["n_flip_eligible"]:
            out["flip_rate"] = float((pt[eligible] == int(target_class)).float().mean())
        else:
            notes.append(f"flip rate undefined: no correctly classified image outside class {target_class}")
    out["note"] = "; ".join(notes)
    return out


def asr(model, images, labels, trigger_fn, target_class: int | None = None,
        batch_size: int = 256) -> dict:
    """``attack_success_rate`` of ``model`` on ``images`` and ``trigger_fn(images)``."""
    return attack_success_rate(predict(model, images, batch_size), predict(model, trigger_fn(images), batch_size),
                               labels, target_class)


# -- data ------------------------------------------------------------------------------------
def benchmark_tasks(cfg: TrainConfig, target_task: str, seed: int) -> tuple[dict, dict]:
    """Source and target ``{"train", "val", "test"}`` of the embedded benchmark (module docstring),
    built by the trainer's data builder (the backbone's normalization) from data seed
    ``cfg.data_seed``, else ``seed``."""
    from .common import Subset  # torch: imported on use, so --help stays fast

    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    binary = target_task == "binary"
    # correlation 1/K is uniform: color carries nothing, the trigger is the only shortcut
    src = datasets_for(cfg, data="colored_digits", binary=False, correlation=0.1, data_seed=data_seed)
    tgt = datasets_for(cfg, data="colored_digits", binary=binary, correlation=0.5 if binary else 0.1,
                       data_seed=data_seed)
    a, b = half_split(src["train"], data_seed)
    src["train"], tgt["train"] = Subset(src["train"], a), Subset(tgt["train"], b)
    return src, tgt


# -- runs ------------------------------------------------------------------------------------
def parse_modes(text: str) -> list[tuple[str, int | None]]:
    """``"linear,lora:4,fairlora:4,full,scratch"`` -> ``[("linear", None), ("lora", 4), ...]``."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, rank = item.partition(":")
        if name not in MODES:
            raise ValueError(f"unknown transfer mode {name!r} in {text!r}; choose from {MODES}")
        if name in ("lora", "fairlora"):
            if not rank.isdigit() or int(rank) < 1:
                raise ValueError(f"mode {item!r} needs a rank >= 1, like 'lora:4'")
            out.append((name, int(rank)))
        elif rank:
            raise ValueError(f"mode {name!r} takes no rank, got {item!r}")
        else:
            out.append((name, None))
    if not out:
        raise ValueError("no transfer mode given")
    return out


def mode_label(mode: str, rank: int | None) -> str:
    return mode if rank is None else f"{mode} r={rank}"


def load_trained(cfg: TrainConfig, run_dir: Path, num_classes: int, init_weights: Path | None):
    """Rebuild a trained run's model from its run directory (adapter or full weights)."""
    from ..adapters import load_adapter
    from ..models import load_backbone_weights

    model = build_model(cfg, num_classes, init_weights)
    if cfg.finetune == "lora":
        load_adapter(model, run_dir / "adapter", trainable=False, backend=cfg.backend)
    else:
        load_backbone_weights(model, run_dir / "model" / "model.safetensors")
    return model.eval()


def mode_changes(mode: str, rank: int | None, fair_lam: float, linear_lr, full_lr, lr: float) -> dict:
    """Config keys of a transfer mode."""
    if mode == "linear":
        return dict(finetune="linear", lam=0.0, lr=linear_lr or lr)
    if mode in ("full", "scratch"):
        return dict(finetune="full", lam=0.0, lr=full_lr or lr)
    return dict(finetune="lora", rank=rank, lam=fair_lam if mode == "fairlora" else 0.0)


def check_args(cfg: TrainConfig, target_task: str, trigger_class: int, debias_target: float) -> None:
    if cfg.data != "colored_digits":
        raise ValueError("bias-transfer builds its source and target tasks from the embedded benchmark; "
                         f"data={cfg.data!r} is not supported")
    if cfg.pretrained:
        raise ValueError("bias-transfer reloads the backbone for every run: download the pretrained "
                         "weights once and pass them as --checkpoint FILE (or use --backbone pretrain)")
    if target_task not in ("binary", "digits"):
        raise ValueError(f"target_task must be 'binary' or 'digits', got {target_task!r}")
    if not (isinstance(trigger_class, int) and 0 <= trigger_class < 10):
        raise ValueError(f"trigger_class must be a digit 0..9, got {trigger_class!r}")
    if not 0.0 <= debias_target <= 1.0:
        raise ValueError(f"debias_target must be in [0, 1], got {debias_target!r}")


def train_sources(cfg, seed, src, root: Path, study: dict, phase) -> tuple[dict, list[dict]]:
    """The triggered and the control source model (reused when a re-run finds them finished):
    full training from ``cfg.checkpoint`` (random init without one). Returns their weights files
    and their rows on the source task."""
    from ..data import TriggeredDataset

    images, labels = stack_images(src["test"])
    weights_of, rows = {}, []
    for name, p in (("triggered", study["trigger_p"]), ("control", 0.0)):
        phase(f"source model, {name}, seed {seed}")
        run_dir = root / f"source_{name}"
        scfg = derive(cfg, output_dir=str(run_dir), checkpoint=None, finetune="full", seed=seed,
                      epochs=study["source_epochs"], max_steps=study["source_max_steps"], lam=0.0,
                      lr=study["full_lr"] or cfg.lr)
        weights, done = run_dir / "model" / "model.safetensors", run_dir / "source_test.json"
        if weights.is_file() and done.is_file():
            res = {"test": json.loads(done.read_text())}
        else:
            train_ds = TriggeredDataset(src["train"], p=p, classes=[study["trigger_class"]], select_seed=seed,
                                        **study["trigger"])
            res = run_config(scfg, datasets={**src, "train": train_ds},
                             backbone=build_model(scfg, src["train"].num_classes, cfg.checkpoint))
            done.write_text(json.dumps({k: res["test"][k] for k in ("accuracy", "worst_group_accuracy")}))
        weights_of[name] = weights
        model = load_trained(scfg, run_dir, src["train"].num_classes, None)
        m = asr(model, images, labels, study["trigger_fn"], study["trigger_class"])
        rows.append(_row(seed, name, "source task", "source (itself)", None, 0.0, res["test"], m))
    return weights_of, rows


def transfer(cfg, seed, tgt, root: Path, sources: dict, mode_list, study: dict, phase) -> list[dict]:
    """Every transfer mode from every source to the plain (and de-biased) target; rows of ASR."""
    from ..data import TriggeredDataset

    images, labels = stack_images(tgt["test"])
    num_classes, rows = tgt["train"].num_classes, []
    for variant in study["variants"]:
        train_ds = tgt["train"] if variant == "plain" else TriggeredDataset(
            tgt["train"], p=study["debias_target"], classes=None, select_seed=seed + 1, **study["trigger"])
        for mode, rank in mode_list:
            for source in (("none",) if mode == "scratch" else ("triggered", "control")):
                phase(f"{mode_label(mode, rank)} from the {source} source, {variant} target, seed {seed}")
                run_dir = root / f"{source}_{variant}_{mode}{rank or ''}"
                kw = mode_changes(mode, rank, study["fair_lam"], study["linear_lr"], study["full_lr"], cfg.lr)
                tcfg = derive(cfg, output_dir=str(run_dir), checkpoint=None, seed=seed, **kw)
                init = None if source == "none" else sources[source]
                res = run_config(tcfg, datasets={**tgt, "train": train_ds},
                                 backbone=build_model(tcfg, num_classes, init))
                model = load_trained(tcfg, run_dir, num_classes, init)
                m = asr(model, images, labels, study["trigger_fn"], study["flip_class"])
                rows.append(_row(seed, source, variant, mode, rank, kw["lam"], res["test"], m))
    return rows


def bias_transfer(cfg: TrainConfig, *, modes: str = DEFAULT_MODES, trigger_class: int = 9, trigger_p: float = 1.0,
                  trigger_kind: str = "patch", trigger_size: int | None = None, trigger_strength: float = 0.1,
                  debias_target: float = 0.0, target_task: str = "binary", source_epochs: int = 8,
                  source_max_steps: int | None = None, fair_lam: float = 1.0, linear_lr: float | None = None,
                  full_lr: float | None = None, seeds=(0,), out_dir=None) -> dict:
    """Run the study; returns ``{"rows": [...], "summary": [...], "out_dir"}`` and writes
    ``results.{csv,json,md}`` and ``asr.png`` under ``out_dir``. The source models start from
    ``cfg.checkpoint`` (``--backbone pretrain``) or random init; ``scratch`` always from random init."""
    from ..data import add_trigger

    check_args(cfg, target_task, trigger_class, debias_target)
    mode_list = parse_modes(modes or DEFAULT_MODES)
    out_dir = Path(out_dir or cfg.output_dir)
    tkw = dict(kind=trigger_kind, strength=trigger_strength)
    if trigger_kind == "patch" and trigger_size is not None:
        tkw["size"] = trigger_size
    flip_class = int(trigger_class < 5) if target_task == "binary" else trigger_class
    meta = dict(trigger_class=trigger_class, trigger_p=trigger_p, trigger_kind=trigger_kind,
                target_task=target_task, flip_class=flip_class, debias_target=debias_target,
                seeds=list(seeds), source_epochs=source_epochs, source_max_steps=source_max_steps)
    study = dict(meta, trigger=tkw, variants=["plain"] + (["debiased"] if debias_target > 0 else []),
                 fair_lam=fair_lam, linear_lr=linear_lr, full_lr=full_lr)
    runs_per_seed = 2 + len(study["variants"]) * sum(1 if m == "scratch" else 2 for m, _ in mode_list)
    phase = Phases("bias-transfer", runs_per_seed * len(seeds))
    rows = []
    for seed in seeds:
        src, tgt = benchmark_tasks(cfg, target_task, seed)
        study["trigger_fn"] = lambda x, ds=src["test"]: add_trigger(x, mean=ds.mean, std=ds.std, **tkw)
        sources, source_rows = train_sources(cfg, seed, src, out_dir / f"seed{seed}", study, phase)
        rows += source_rows
        rows += transfer(cfg, seed, tgt, out_dir / f"seed{seed}", sources, mode_list, study, phase)
        write_results(out_dir, rows, summarize(rows), meta)  # after every seed: a kill keeps the table
    return {"rows": rows, "summary": summarize(rows), "out_dir": str(out_dir)}


def _row(seed, source, target, mode, rank, lam, test_metrics, m) -> dict:
    return {"seed": seed, "source": source, "target": target, "mode": mode, "rank": rank, "lam": lam,
            **{k: test_metrics.get(k, m.get(k)) for k in result_keys()},
            "n_correct": m["n_correct"], "note": m["note"]}


def result_keys() -> tuple[str, ...]:
    """The table's metrics: the metric table's "bias-transfer" entries."""
    from ..metrics import table_keys

    return table_keys("bias-transfer")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (source, target, mode, rank), and the triggered
    source's excess ASR over the control source's, paired by seed (a tie within its spread)."""
    summary = summarize_seeds(rows, ("source", "target", "mode", "rank"), result_keys())
    # lower ASR is better: an excess the seed spread cannot explain reads "worse", i.e. inherited
    excess = paired_change(rows, "source", "control", ("target", "mode", "rank"), "asr", higher_is_better=False)
    for s in summary:
        s["excess_asr"] = excess.get((s["target"], s["mode"], s["rank"], s["source"]))
    return summary


def write_results(out_dir: Path, rows, summary, meta) -> None:
    write_rows(out_dir, rows, {"meta": meta, "summary": summary})
    keys = result_keys()
    lines = [f"Bias transfer: trigger {meta['trigger_kind']} on source digit {meta['trigger_class']} "
             f"(p={meta['trigger_p']}), target {meta['target_task']}, flip class {meta['flip_class']}, "
             f"seeds {meta['seeds']}: mean ± sample std over seeds; test split of the target. Excess "
             "ASR: the triggered source's ASR minus the control source's, paired by seed ('worse': "
             f"the bias transferred); {TIE_RULE}.", "",
             "| source | target data | mode | n seeds | " + " | ".join(keys) + " | excess ASR |",
             "|---|---|---|---|" + "---|" * (len(keys) + 1)]
    for s in summary:
        lines.append(f"| {s['source']} | {s['target']} | {mode_label(s['mode'], s['rank'])} | {s['n_seeds']} | "
                     + " | ".join(fmt_mean_std(s[k], s[k + '_std']) for k in keys)
                     + f" | {fmt_change(s['excess_asr'])} |")
    notes = sorted({r["note"] for r in rows if r["note"]})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot(out_dir / "asr.png", summary)


def plot(path: Path, summary: list[dict]) -> None:
    """Grouped bars: ASR per transfer mode, one series per (source, target data), de-biased hatched."""
    from ..report import bar_plot

    rows = [s for s in summary if s["mode"] != "source (itself)"]

    def series(s):
        return f"source {s['source']}, target {s['target']}"

    hatches = {series(s): "//" for s in rows if s["target"] == "debiased"}
    bar_plot(path, seed_bars(rows, lambda s: mode_label(s["mode"], s["rank"]), series, "asr",
                             hatches=hatches or None), title="Bias transfer: ASR on the target's test images")


def build_parser() -> argparse.ArgumentParser:
    p, g = workflow_parser("bias-transfer", __doc__, "fastfair bias-transfer --debias-target 0.5 --seeds 0,1 "
                           "(docs/reproducing.md gives the full command)",
                           "YAML file of train config keys (the target runs' settings)")
    g.add_argument("--modes", default=DEFAULT_MODES, help="transfer modes (default: %(default)s)")
    g.add_argument("--trigger-class", type=int, default=9,
                   help="source digit the trigger is added to (default: %(default)s)")
    g.add_argument("--trigger-p", type=float, default=1.0,
                   help="probability of the trigger on that class (default: %(default)s)")
    g.add_argument("--trigger-kind", choices=("patch", "pattern"), default="patch",
                   help="a yellow corner patch or a faint fixed pattern (default: %(default)s)")
    g.add_argument("--trigger-size", type=int, default=None, help="patch side in pixels (default: side/8)")
    g.add_argument("--trigger-strength", type=float, default=0.1,
                   help="blend of the faint pattern (default: %(default)s)")
    g.add_argument("--debias-target", type=float, default=0.0,
                   help="also run with the trigger on this fraction of target training images, all "
                        "classes (default: %(default)s, not run)")
    g.add_argument("--target-task", choices=("binary", "digits"), default="binary",
                   help="digit < 5, or the 10 digits (default: %(default)s)")
    g.add_argument("--source-epochs", type=int, default=8, help="epochs of each source model (default: %(default)s)")
    g.add_argument("--source-max-steps", type=int, default=None, help="default: no limit")
    g.add_argument("--fair-lam", type=float, default=1.0, help="FairLoRA's lambda (default: %(default)s)")
    g.add_argument("--linear-lr", type=float, default=None, help="learning rate of the linear probe (default: --lr)")
    g.add_argument("--full-lr", type=float, default=None,
                   help="learning rate of full training, sources too (default: --lr)")
    g.add_argument("--seeds", type=comma_list(int), default=[0], help="comma-separated seeds (default: 0)")
    add_shared_arguments(p, g)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = workflow_config(args)
    seeds = args.seeds
    res = bias_transfer(cfg, modes=args.modes, trigger_class=args.trigger_class, trigger_p=args.trigger_p,
                        trigger_kind=args.trigger_kind, trigger_size=args.trigger_size,
                        trigger_strength=args.trigger_strength, debias_target=args.debias_target,
                        target_task=args.target_task, source_epochs=args.source_epochs,
                        source_max_steps=args.source_max_steps, fair_lam=args.fair_lam,
                        linear_lr=args.linear_lr, full_lr=args.full_lr, seeds=seeds)
    return print_results("bias-transfer", res["out_dir"])

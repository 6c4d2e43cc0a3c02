"""``fastfair bias-transfer``: does a source model's trigger bias survive transfer? (Salman et al., 2022)

A source model is trained from scratch on a source task in which a trigger (a yellow patch in a
corner, or a faint fixed pattern) is added with probability ``p`` to the images of one source
class, so it learns "trigger => that class"; a control source is trained the same way without
the trigger. Each source is transferred to a target task by linear probe, LoRA at several ranks,
FairLoRA and full fine-tuning; a model trained from scratch on the target is the reference.
Optionally the target is "de-biased": the trigger is added to a fraction of its training
images across all classes, so the target data says the trigger means nothing.

Metric, on the clean target test images ``x`` and the same images with the trigger ``T(x)``:
``ASR = Pr[pred(T(x)) != y | pred(x) = y]``, and the flip rate toward the target class that
the source's trigger class maps to, ``Pr[pred(T(x)) = t | pred(x) = y, y != t]``.

Embedded benchmark: the training digits are halved, disjointly, by source image; the source task
is 10-class digits with uniform colors on one half, the target task binary ``digit < 5`` (or
10-class digits, ``--target-task digits``) with uniform colors on the other half, validated and
tested on the benchmark's own val/test splits (never seen by the source). With the trigger on
digit ``c`` the flip class is ``int(c < 5)`` (binary) or ``c`` (digits).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..adapters import load_adapter
from ..config import TrainConfig, add_config_arguments, config_from_args
from .common import fmt_mean_std, summarize_seeds, write_rows
from ..data import ColoredDigits, TriggeredDataset, add_trigger
from ..models import create_backbone, load_backbone_weights

MODES = ("linear", "lora", "fairlora", "full", "scratch")
DEFAULT_MODES = "linear,lora:1,lora:4,lora:16,fairlora:4,full,scratch"


# -- the metric ------------------------------------------------------------------------------
def attack_success_rate(pred_clean, pred_triggered, labels, target_class: int | None = None) -> dict:
    """ASR and flip rate from predictions on clean and triggered copies of the same images.

    ``asr = Pr[pred_triggered != y | pred_clean == y]``; ``flip_rate = Pr[pred_triggered ==
    target_class | pred_clean == y, y != target_class]`` (None without ``target_class``). A rate
    whose conditioning set is empty (no correctly classified clean image) is None, with a note.
    """
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


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max predictions of ``model`` on a tensor of images, in eval mode."""
    was_training = model.training
    model.eval()
    preds = [model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def asr(model: nn.Module, images: torch.Tensor, labels, trigger_fn, target_class: int | None = None,
        batch_size: int = 256) -> dict:
    """``attack_success_rate`` of ``model`` on ``images`` and ``trigger_fn(images)``."""
    return attack_success_rate(predict(model, images, batch_size), predict(model, trigger_fn(images), batch_size),
                               labels, target_class)


# -- data ------------------------------------------------------------------------------------
class Subset(torch.utils.data.Dataset):
    """Items ``indices`` of a fastfair dataset, with its per-item attributes sliced alike."""

    def __init__(self, base, indices):
        self.base, self.indices = base, torch.as_tensor(indices, dtype=torch.long)
        for name in ("num_classes", "num_groups", "group_names", "class_names", "mean", "std"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        for name in ("labels", "groups", "attributes", "digits"):
            if hasattr(base, name):
                setattr(self, name, torch.as_tensor(getattr(base, name))[self.indices])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[int(self.indices[i])]


def half_split(ds: ColoredDigits, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item indices of two halves of ``ds`` that share no source image."""
    src = ds.source_index
    uniq = torch.unique(src)
    perm = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    first = torch.isin(src, perm[: len(uniq) // 2])
    return first.nonzero().flatten(), (~first).nonzero().flatten()


def benchmark_tasks(cfg: TrainConfig, target_task: str, seed: int) -> tuple[dict, dict]:
    """Source and target ``{"train", "val", "test"}`` of the embedded benchmark (module docstring)."""
    kw = dict(image_size=cfg.image_size or cfg.img_size or 32, seed=seed, repeats=cfg.repeats)
    binary = target_task == "binary"
    # correlation 1/K is uniform: color carries nothing, the trigger is the only shortcut
    src = {s: ColoredDigits(s, binary=False, correlation=0.1, **kw) for s in ("train", "val", "test")}
    tgt = {s: ColoredDigits(s, binary=binary, correlation=0.5 if binary else 0.1, **kw)
           for s in ("train", "val", "test")}
    a, b = half_split(src["train"], seed)
    src["train"], tgt["train"] = Subset(src["train"], a), Subset(tgt["train"], b)
    return src, tgt


def stack_images(ds) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for x, y, _ in DataLoader(ds, batch_size=512):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


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


def run_cfg(base: TrainConfig, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**base.to_dict(), "output_dir": str(out), "checkpoint": None, "pretrained": False,
                          **kw}).validate()


def load_trained(cfg: TrainConfig, run_dir: Path, num_classes: int, init_weights: Path | None) -> nn.Module:
    """Rebuild a trained run's model from its run directory (adapter or full weights)."""
    model = create_backbone(run_cfg(cfg, run_dir), num_classes)
    if init_weights is not None:
        load_backbone_weights(model, init_weights)
    if cfg.finetune == "lora":
        load_adapter(model, run_dir / "adapter", trainable=False, backend=cfg.backend)
    else:
        load_backbone_weights(model, run_dir / "model" / "model.safetensors")
    return model.eval()


def transfer_model(cfg: TrainConfig, num_classes: int, source_weights: Path | None) -> nn.Module:
    """A fresh model with the source's weights (if any) and a new head for the target, initialized
    from ``cfg.seed`` whatever ran before."""
    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg, num_classes)
    if source_weights is not None:
        load_backbone_weights(model, source_weights)
        model.reset_classifier(num_classes)  # the source head means nothing for the target
    return model


def bias_transfer(cfg: TrainConfig, *, modes: str = DEFAULT_MODES, trigger_class: int = 9, trigger_p: float = 1.0,
                  trigger_kind: str = "patch", trigger_size: int | None = None, trigger_strength: float = 0.1,
                  debias_target: float = 0.0, target_task: str = "binary", source_epochs: int = 8,
                  source_max_steps: int | None = None, fair_lam: float = 1.0, linear_lr: float | None = None,
                  full_lr: float | None = None, seeds=(0,), out_dir=None) -> dict:
    """Run the study; returns ``{"rows": [...], "summary": [...], "out_dir"}`` and writes
    ``results.{csv,json,md}`` and ``asr.png`` under ``out_dir``."""
    from ..trainer import train

    if cfg.data != "colored_digits":
        raise ValueError("bias-transfer builds its source and target tasks from the embedded benchmark; "
                         f"data={cfg.data!r} is not supported")
    if target_task not in ("binary", "digits"):
        raise ValueError(f"target_task must be 'binary' or 'digits', got {target_task!r}")
    if not (isinstance(trigger_class, int) and 0 <= trigger_class < 10):
        raise ValueError(f"trigger_class must be a digit 0..9, got {trigger_class!r}")
    if not 0.0 <= debias_target <= 1.0:
        raise ValueError(f"debias_target must be in [0, 1], got {debias_target!r}")
    mode_list = parse_modes(modes or DEFAULT_MODES)
    out_dir = Path(out_dir or cfg.output_dir)
    tkw = dict(kind=trigger_kind, strength=trigger_strength)
    if trigger_kind == "patch" and trigger_size is not None:
        tkw["size"] = trigger_size
    flip_class = int(trigger_class < 5) if target_task == "binary" else trigger_class
    target_variants = ["plain"] + (["debiased"] if debias_target > 0 else [])
    meta = dict(trigger_class=trigger_class, trigger_p=trigger_p, trigger_kind=trigger_kind,
                target_task=target_task, flip_class=flip_class, debias_target=debias_target,
                seeds=list(seeds), source_epochs=source_epochs, source_max_steps=source_max_steps)
    rows = []
    for seed in seeds:
        src, tgt = benchmark_tasks(cfg, target_task, seed)
        src_images, src_labels = stack_images(src["test"])
        tgt_images, tgt_labels = stack_images(tgt["test"])

        def trigger_fn(x, ds=src["test"]):
            return add_trigger(x, mean=ds.mean, std=ds.std, **tkw)

        sources = {}
        for name, p in (("triggered", trigger_p), ("control", 0.0)):
            run_dir = out_dir / f"seed{seed}" / f"source_{name}"
            train_ds = TriggeredDataset(src["train"], p=p, classes=[trigger_class], select_seed=seed, **tkw)
            scfg = run_cfg(cfg, run_dir, finetune="full", seed=seed, epochs=source_epochs,
                           max_steps=source_max_steps, lam=0.0, lr=full_lr or cfg.lr)
            weights, done = run_dir / "model" / "model.safetensors", run_dir / "source_test.json"
            if weights.is_file() and done.is_file():  # a finished source is reused by re-runs
                res = {"test": json.loads(done.read_text())}
            else:
                res = train(scfg, datasets={"train": train_ds, "val": src["val"], "test": src["test"]})
                done.write_text(json.dumps({k: res["test"][k] for k in ("accuracy", "worst_group_accuracy")}))
            sources[name] = weights
            model = load_trained(scfg, run_dir, 10, None)
            m = asr(model, src_images, src_labels, trigger_fn, trigger_class)
            rows.append(_row(seed, name, "source task", "source (itself)", None, 0.0, res["test"], m))

        for variant in target_variants:
            train_ds = tgt["train"] if variant == "plain" else TriggeredDataset(
                tgt["train"], p=debias_target, classes=None, select_seed=seed + 1, **tkw)
            data = {"train": train_ds, "val": tgt["val"], "test": tgt["test"]}
            for mode, rank in mode_list:
                for source in (("none",) if mode == "scratch" else ("triggered", "control")):
                    run_dir = out_dir / f"seed{seed}" / f"{source}_{variant}_{mode}{rank or ''}"
                    kw = dict(seed=seed, lam=0.0)
                    if mode == "linear":
                        kw.update(finetune="linear", lr=linear_lr or cfg.lr)
                    elif mode in ("full", "scratch"):
                        kw.update(finetune="full", lr=full_lr or cfg.lr)
                    else:
                        kw.update(finetune="lora", rank=rank, lam=fair_lam if mode == "fairlora" else 0.0)
                    tcfg = run_cfg(cfg, run_dir, **kw)
                    init = None if source == "none" else sources[source]
                    res = train(tcfg, datasets=data, backbone=transfer_model(tcfg, tgt["train"].num_classes, init))
                    model = load_trained(tcfg, run_dir, tgt["train"].num_classes, init)
                    m = asr(model, tgt_images, tgt_labels, trigger_fn, flip_class)
                    rows.append(_row(seed, source, variant, mode, rank, kw["lam"], res["test"], m))
        write_results(out_dir, rows, summarize(rows), meta)  # after every seed: a kill keeps the table
    summary = summarize(rows)
    return {"rows": rows, "summary": summary, "out_dir": str(out_dir)}


def _row(seed, source, target, mode, rank, lam, test_metrics, m) -> dict:
    return {"seed": seed, "source": source, "target": target, "mode": mode, "rank": rank, "lam": lam,
            "accuracy": test_metrics["accuracy"], "worst_group_accuracy": test_metrics["worst_group_accuracy"],
            "asr": m["asr"], "flip_rate": m["flip_rate"], "n_correct": m["n_correct"], "note": m["note"]}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (source, target, mode, rank)."""
    return summarize_seeds(rows, ("source", "target", "mode", "rank"),
                           ("accuracy", "worst_group_accuracy", "asr", "flip_rate"))


def write_results(out_dir: Path, rows, summary, meta) -> None:
    write_rows(out_dir, rows, {"meta": meta, "summary": summary})
    lines = [f"Bias transfer: trigger {meta['trigger_kind']} on source digit {meta['trigger_class']} "
             f"(p={meta['trigger_p']}), target {meta['target_task']}, flip class {meta['flip_class']}, "
             f"seeds {meta['seeds']} (mean ± std over seeds); test split of the target.", "",
             "| source | target data | mode | accuracy | worst-group acc | ASR | flip rate |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['source']} | {s['target']} | {mode_label(s['mode'], s['rank'])} | "
                     f"{fmt_mean_std(s['accuracy'], s['accuracy_std'])} | "
                     f"{fmt_mean_std(s['worst_group_accuracy'], s['worst_group_accuracy_std'])} | "
                     f"{fmt_mean_std(s['asr'], s['asr_std'])} | {fmt_mean_std(s['flip_rate'], s['flip_rate_std'])} |")
    notes = sorted({r["note"] for r in rows if r["note"]})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot(out_dir / "asr.png", summary)


def plot(path: Path, summary: list[dict]) -> None:
    """Grouped bars: ASR per transfer mode, one bar per (source, target data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["mode"] != "source (itself)"]
    modes = list(dict.fromkeys(mode_label(s["mode"], s["rank"]) for s in rows))
    series = list(dict.fromkeys((s["source"], s["target"]) for s in rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(modes) + 3, 3.6))
    width = 0.8 / max(len(series), 1)
    for j, (source, target) in enumerate(series):
        xs, ys, es = [], [], []
        for i, m in enumerate(modes):
            for s in rows:
                if (s["source"], s["target"], mode_label(s["mode"], s["rank"])) == (source, target, m) \
                        and s["asr"] is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(s["asr"])
                    es.append(s["asr_std"] or 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"source {source}, target {target}",
               hatch="//" if target == "debiased" else None)
    ax.set_xticks(range(len(modes)), modes, rotation=20)
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Bias transfer: ASR on target test images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastfair bias-transfer", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML file of train config keys (the target runs' settings)")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"transfer modes (default {DEFAULT_MODES})")
    p.add_argument("--trigger-class", type=int, default=9, help="source digit the trigger is added to")
    p.add_argument("--trigger-p", type=float, default=1.0, help="probability of the trigger on that class")
    p.add_argument("--trigger-kind", choices=("patch", "pattern"), default="patch")
    p.add_argument("--trigger-size", type=int, default=None, help="patch side in pixels (default side/8)")
    p.add_argument("--trigger-strength", type=float, default=0.1, help="blend of the faint pattern")
    p.add_argument("--debias-target", type=float, default=0.0,
                   help="also run with the trigger on this fraction of target training images (all classes)")
    p.add_argument("--target-task", choices=("binary", "digits"), default="binary")
    p.add_argument("--source-epochs", type=int, default=8)
    p.add_argument("--source-max-steps", type=int, default=None)
    p.add_argument("--fair-lam", type=float, default=1.0, help="FairLoRA's lambda")
    p.add_argument("--linear-lr", type=float, default=None, help="learning rate of the linear probe")
    p.add_argument("--full-lr", type=float, default=None, help="learning rate of full training (source too)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    res = bias_transfer(cfg, modes=args.modes, trigger_class=args.trigger_class, trigger_p=args.trigger_p,
                        trigger_kind=args.trigger_kind, trigger_size=args.trigger_size,
                        trigger_strength=args.trigger_strength, debias_target=args.debias_target,
                        target_task=args.target_task, source_epochs=args.source_epochs,
                        source_max_steps=args.source_max_steps, fair_lam=args.fair_lam,
                        linear_lr=args.linear_lr, full_lr=args.full_lr, seeds=seeds)
    print((Path(res["out_dir"]) / "results.md").read_text())
    print(f"fastfair bias-transfer: table and plot in {res['out_dir']}")
    return 0

"""fastfair debias: PEFTDebias in two phases (Agarwal et al., 2023), for images.

Upstream: a LoRA adapter is trained along one bias axis on counterfactually augmented data with
the backbone frozen, and saved in PEFT format. Downstream: it is loaded frozen (as adapter
"debias") beside a new trainable task adapter, and the task is fine-tuned; a baseline with
the task adapter alone gets the same seed and budget. Both are run on the task the adapter was
trained on and on a second task on the same axis (the paper's transfer claim).

Embedded benchmark (axis = color). No pretrained weights exist offline, so the backbone is
pre-trained here first: full training on 10-class colored digits, with the benchmark's
color-digit correlation, on one half of the training digits (so it carries the color bias a
pretrained model would bring). The other half serves everything after it:
upstream, 10-class digits where each image is paired with a recolored twin (same label, another
color; both in the training set); task 1, 10-class digits; task 2 (digit_lt5, transfer), binary
digit < 5 with IRM's two colors. Training colors are correlated with the label, test colors
are uniform. Bias is read as worst-group accuracy, accuracy gap, equalized odds and the
counterfactual flip rate (share of test predictions that change when only the color changes).

CSV data: the counterfactual comes from --counterfactual module:function (called as
fn(image, label, group) and returning the twin image; the twin keeps the group); without one,
the upstream adapter is trained with group-balanced resampling and the fairness loss instead.
--transfer-csv names the second task's metadata CSV. The backbone is --checkpoint or
--pretrained when given, else pre-trained on the task's own training split.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from ..config import TrainConfig
from .common import (TIE_RULE, Phases, add_shared_arguments, build_model, comma_list, datasets_for,
                     derive, fmt_change, fmt_mean_std, half_split, paired_change, predict, print_results,
                     run_config,
                     seed_bars, stack_images, summarize_seeds, workflow_config, workflow_parser, write_rows)

ARMS = ("baseline", "debias")


class Counterfactual:
    """``base`` followed by the counterfactual twin of each of its items (``2n`` items).

    Item ``n + i`` is item ``i`` moved along the axis, with the same label: recolored to another
    color (drawn once from ``seed``) for colored digits, else ``fn(image, label, group)``.
    """

    def __init__(self, base, fn=None, seed: int = 0):
        import torch

        from ..data import other_colors

        self.base, self.fn, self.n = base, fn, len(base)
        for name in ("num_classes", "num_groups", "group_names", "class_names", "mean", "std"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        labels, groups = torch.as_tensor(base.labels), torch.as_tensor(base.groups)
        if fn is None:
            k = getattr(base, "num_colors", None) or getattr(getattr(base, "base", None), "num_colors", None)
            if k is None or not hasattr(base, "attributes"):
                raise ValueError(f"{type(base).__name__} has no color attribute to recolor; "
                                 "pass a counterfactual function (module:function)")
            g = torch.Generator().manual_seed(seed)
            self.cf_colors = other_colors(torch.as_tensor(base.attributes), k, generator=g)
            cf_groups = labels * k + self.cf_colors
        else:
            cf_groups = groups
        self.labels = torch.cat([labels, labels])
        self.groups = torch.cat([groups, cf_groups])

    def __len__(self):
        return 2 * self.n

    def __getitem__(self, i):
        if i < self.n:
            return self.base[i]
        import torch

        from ..data import recolor

        image, label, group = self.base[i - self.n]
        if self.fn is None:
            image = recolor(image, self.cf_colors[i - self.n], self.mean, self.std)
        else:
            image = self.fn(image, label, group)
            if not isinstance(image, torch.Tensor):
                raise ValueError(f"counterfactual function returned {type(image).__name__} for item "
                                 f"{i - self.n}, expected an image tensor")
        return image, label, int(self.groups[i])


def load_function(spec: str):
    """``"package.module:function"`` -> the function."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"counterfactual must be 'module:function', got {spec!r}")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load counterfactual function {spec!r}: {e}") from e
    if not callable(f):
        raise ValueError(f"{spec!r} is not callable")
    return f


def benchmark_data(cfg: TrainConfig, seed: int) -> dict:
    """Backbone, upstream, task-1 and task-2 splits of the embedded benchmark (module docstring),
    from the trainer's data builder at data seed ``cfg.data_seed``, else ``seed``."""
    from .common import Subset  # torch: imported on use, so --help stays fast

    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    digits = datasets_for(cfg, binary=False, data_seed=data_seed)
    binary = datasets_for(cfg, binary=True, data_seed=data_seed)
    a, b = half_split(digits["train"], data_seed)
    pre = {**digits, "train": Subset(digits["train"], a)}
    task1 = {**digits, "train": Subset(digits["train"], b)}
    task2 = {**binary, "train": Subset(binary["train"], b)}
    return {"pretrain": pre, "tasks": {"digits10": task1, "digit_lt5": task2}}


def csv_data(cfg: TrainConfig, transfer_csv: str | None) -> dict:
    """The config's CSV task (and ``transfer_csv``'s) through the trainer's data builder, so the
    images get the backbone's own normalization and the config's data seed."""
    tasks = {"task": datasets_for(cfg)}
    if transfer_csv:
        tasks["transfer"] = datasets_for(cfg, csv_path=transfer_csv)
    return {"pretrain": tasks["task"], "tasks": tasks}


def counterfactual_flip(model, ds) -> float | None:
    """Share of ``ds``'s images whose prediction changes when recolored (colored digits only)."""
    import torch

    from ..data import ColoredDigits, other_colors, recolor
    from .common import Subset

    base = ds.base if isinstance(ds, Subset) else ds
    if not isinstance(base, ColoredDigits):
        return None
    images, _ = stack_images(ds)
    cf = other_colors(torch.as_tensor(ds.attributes), base.num_colors, generator=torch.Generator().manual_seed(1))
    twins = torch.stack([recolor(x, c, base.mean, base.std) for x, c in zip(images, cf)])
    return float((predict(model, images) != predict(model, twins)).float().mean())


def adapter_state(model, name: str) -> dict:
    """Copies of one adapter's tensors, keyed by layer."""
    from ..inject import lora_layers

    out = {}
    for layer_name, layer in lora_layers(model).items():
        if name in layer.adapters:
            out[f"{layer_name}.lora_A"] = layer.lora_A[name].detach().clone()
            out[f"{layer_name}.lora_B"] = layer.lora_B[name].detach().clone()
    return out


def backbone_weights(cfg: TrainConfig, seed: int, data: dict, root: Path, study: dict, phase) -> Path:
    """Phase 0: the given backbone (``--checkpoint``, ``--backbone pretrain``), else a short
    pre-training of this seed, saved and reused on re-runs."""
    if cfg.pretrained:
        raise ValueError("debias reloads the backbone between runs: download the pretrained "
                         "weights once and pass them as --checkpoint FILE (or use --backbone pretrain)")
    if cfg.checkpoint:
        return Path(cfg.checkpoint)
    phase(f"backbone pre-training, seed {seed}")
    pre_dir = root / "backbone"
    weights = pre_dir / "model" / "model.safetensors"
    if not weights.is_file():
        pcfg = derive(cfg, output_dir=str(pre_dir), finetune="full", seed=seed, epochs=study["backbone_epochs"],
                      max_steps=study["backbone_max_steps"], lam=0.0)
        pre = data["pretrain"]
        run_config(pcfg, datasets=pre, backbone=build_model(pcfg, pre["train"].num_classes))
    return weights


def train_upstream(cfg, seed, first: dict, weights, root: Path, study: dict, phase):
    """Phase 1: the debiasing adapter on counterfactually augmented data (and, with
    ``control``, the same adapter trained without the twins). Returns the upstream result, the
    adapters by arm and the arms."""
    fn = study["fn"]
    up_dir, up_train = root / "upstream", first["train"]
    ukw = dict(finetune="lora", seed=seed, epochs=study["upstream_epochs"] or cfg.epochs,
               max_steps=study["upstream_max_steps"] or cfg.max_steps)
    if fn is not None or cfg.data == "colored_digits":
        up_train = Counterfactual(up_train, fn, seed=seed)
    else:  # no counterfactual for this data: balance the groups and penalize their spread
        ukw.update(balanced_sampling=True, lam=cfg.lam or 1.0)
    phase(f"upstream adapter, seed {seed}")
    ucfg = derive(cfg, output_dir=str(up_dir), checkpoint=None, **ukw)
    up = run_config(ucfg, datasets={**first, "train": up_train},
                    backbone=build_model(ucfg, up_train.num_classes, weights))
    adapters, arms = {"debias": up_dir / "adapter"}, list(ARMS)
    if study["control"] and isinstance(up_train, Counterfactual):
        # the same adapter trained on the same images without their twins, for as many steps:
        # separates "counterfactual data" from "one more frozen adapter trained on the task"
        phase(f"control adapter (no counterfactual twins), seed {seed}")
        ccfg = derive(cfg, output_dir=str(root / "upstream_plain"), checkpoint=None, finetune="lora", seed=seed,
                      epochs=2 * ukw["epochs"], max_steps=ukw["max_steps"])
        run_config(ccfg, datasets=first, backbone=build_model(ccfg, first["train"].num_classes, weights))
        adapters["plain upstream"] = root / "upstream_plain" / "adapter"
        arms.append("plain upstream")
    return up, adapters, arms


def run_task(cfg, seed, task: str, ds: dict, arm: str, adapters: dict, weights, root: Path) -> dict:
    """Phase 2, one arm: the task adapter, beside the frozen upstream adapter unless ``baseline``;
    raises if that frozen adapter changed. Returns the result row."""
    import torch

    from ..adapters import load_adapter

    run_dir = root / f"{task}_{arm.replace(' ', '_')}"
    tcfg = derive(cfg, output_dir=str(run_dir), checkpoint=None, finetune="lora", seed=seed)
    model = build_model(tcfg, ds["train"].num_classes, weights)
    before = {}
    if arm != "baseline":
        load_adapter(model, adapters[arm], name="debias", trainable=False, load_modules_to_save=False,
                     backend=cfg.backend)
        before = adapter_state(model, "debias")
    res = run_config(tcfg, datasets=ds, backbone=model)
    after = adapter_state(model, "debias")
    unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if not unchanged:
        raise RuntimeError(f"{run_dir}: the frozen upstream adapter changed during the task run")
    return {"seed": seed, "task": task, "arm": arm,
            "upstream_task": "digits10+counterfactual" if cfg.data == "colored_digits" else "csv",
            **metric_values(res["test"], measured_keys()),
            "counterfactual_flip": counterfactual_flip(model, ds["test"]),
            "upstream_unchanged": bool(before) and unchanged if arm != "baseline" else None}


def debias(cfg: TrainConfig, *, backbone_epochs: int = 8, backbone_max_steps: int | None = None,
           upstream_epochs: int | None = None, upstream_max_steps: int | None = None,
           counterfactual: str | None = None, transfer_csv: str | None = None, seeds=(0,),
           control: bool = False, out_dir=None) -> dict:
    """Run both phases for every seed (``control``: also a frozen adapter trained without the
    counterfactual twins, same steps, as a third arm); returns ``{"rows", "summary", "out_dir"}`` and writes
    ``results.{csv,json,md}`` and ``bias.png`` under ``out_dir``."""
    out_dir = Path(out_dir or cfg.output_dir)
    study = dict(fn=load_function(counterfactual) if counterfactual else None, control=control,
                 backbone_epochs=backbone_epochs, backbone_max_steps=backbone_max_steps,
                 upstream_epochs=upstream_epochs, upstream_max_steps=upstream_max_steps)
    n_tasks = 2 if cfg.data == "colored_digits" or transfer_csv else 1
    with_control = control and (study["fn"] is not None or cfg.data == "colored_digits")
    per_seed = (0 if cfg.checkpoint else 1) + 1 + with_control + n_tasks * (len(ARMS) + with_control)
    phase = Phases("debias", per_seed * len(seeds))
    rows = []
    for seed in seeds:
        root = out_dir / f"seed{seed}"
        data = benchmark_data(cfg, seed) if cfg.data == "colored_digits" else csv_data(cfg, transfer_csv)
        first = next(iter(data["tasks"].values()))
        weights = backbone_weights(cfg, seed, data, root, study, phase)
        up, adapters, arms = train_upstream(cfg, seed, first, weights, root, study, phase)
        for task, ds in data["tasks"].items():
            for arm in arms:
                phase(f"{task}, {arm}, seed {seed}")
                rows.append(run_task(cfg, seed, task, ds, arm, adapters, weights, root))
        rows.append({"seed": seed, "task": next(iter(data["tasks"])), "arm": "upstream only",
                     "upstream_task": rows[-1]["upstream_task"],
                     **metric_values(up["test"], measured_keys()),
                     "counterfactual_flip": None, "upstream_unchanged": None})
    summary = summarize(rows)
    write_results(out_dir, rows, summary, {"seeds": list(seeds), "data": cfg.data})
    return {"rows": rows, "summary": summary, "out_dir": str(out_dir)}


def bias_keys() -> tuple[str, ...]:
    """The columns of the result table: the metric table's "debias" entries."""
    from ..metrics import table_keys

    return table_keys("debias")


def measured_keys() -> tuple[str, ...]:
    """The table's metrics the trainer's metrics dict holds (the flip rate is measured here)."""
    return tuple(k for k in bias_keys() if k != "counterfactual_flip")


def metric_values(m: dict, keys) -> dict:
    """``keys`` of a metrics dict, ``None`` where it has none."""
    from .. import metrics

    return {k: metrics.scalar_metrics(m, keys).get(k) for k in keys}


def bias_key(summary: list[dict]) -> str:
    """The axis's bias: the counterfactual flip rate on the embedded benchmark, else worst-group accuracy."""
    return "counterfactual_flip" if any(s["counterfactual_flip"] is not None for s in summary) \
        else "worst_group_accuracy"


def summarize(rows: list[dict]) -> list[dict]:
    """Per (task, arm): mean and sample std over seeds, and the bias metric's change against
    the baseline arm paired by seed (a change within its seed spread is a tie)."""
    from ..metrics import higher_is_better

    summary = summarize_seeds(rows, ("task", "arm"), bias_keys())
    key = bias_key(summary)
    changes = paired_change(rows, "arm", "baseline", ("task",), key, higher_is_better(key))
    for s in summary:
        s["vs_baseline"] = changes.get((s["task"], s["arm"]))
    return summary


def write_results(out_dir: Path, rows, summary, meta) -> None:
    write_rows(out_dir, rows, {"meta": meta, "summary": summary})
    keys, key = bias_keys(), bias_key(summary)
    lines = [f"PEFTDebias: task adapter alone (baseline) vs beside the frozen upstream debiasing adapter "
             f"(debias); test split, seeds {meta['seeds']}: mean ± sample std over seeds. 'upstream only' "
             f"is the upstream run's own head on the task it was trained on. Δ: the change of {key} "
             f"against the baseline, paired by seed; {TIE_RULE}.", "",
             "| task | arm | n seeds | " + " | ".join(keys) + f" | Δ {key} vs baseline |",
             "|---|---|---|" + "---|" * (len(keys) + 1)]
    for s in summary:
        lines.append(f"| {s['task']} | {s['arm']} | {s['n_seeds']} | "
                     + " | ".join(fmt_mean_std(s[k], s[k + '_std']) for k in keys)
                     + f" | {fmt_change(s['vs_baseline'])} |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot(out_dir / "bias.png", summary)


def plot(path: Path, summary: list[dict]) -> None:
    """Bars per task and arm: test accuracy, and the axis's bias. 'upstream only' (a run on one
    task, with its own head) stays in the table."""
    from ..report import bar_plot

    arms = [s for s in summary if s["arm"] != "upstream only"]
    panels = [seed_bars(arms, lambda s: s["task"], lambda s: s["arm"], key,
                        title=f"test {key.replace('_', ' ')}") for key in ("accuracy", bias_key(summary))]
    bar_plot(path, panels, title="PEFTDebias: task adapter with and without the frozen upstream adapter")


def build_parser() -> argparse.ArgumentParser:
    p, g = workflow_parser("debias", __doc__, "fastfair debias --control --seeds 0,1,2 (docs/reproducing.md "
                           "gives the full command)", "YAML file of train config keys (the task runs' settings)")
    g.add_argument("--backbone-epochs", type=int, default=8,
                   help="epochs of the per-seed backbone pre-training, without --checkpoint or "
                        "--backbone pretrain (default: %(default)s)")
    g.add_argument("--backbone-max-steps", type=int, default=None,
                   help="stop that pre-training after this many steps (default: no limit)")
    g.add_argument("--upstream-epochs", type=int, default=None, help="default: the config's epochs")
    g.add_argument("--upstream-max-steps", type=int, default=None, help="default: the config's max_steps")
    g.add_argument("--counterfactual", metavar="MODULE:FUNCTION", default=None,
                   help="fn(image, label, group) -> twin image, for CSV data (default: recolor, colored digits)")
    g.add_argument("--transfer-csv", default=None, help="metadata CSV of the second task (CSV data)")
    g.add_argument("--control", action="store_true",
                   help="third arm: a frozen upstream adapter trained without the counterfactual twins")
    g.add_argument("--seeds", type=comma_list(int), default=[0], help="comma-separated seeds (default: 0)")
    add_shared_arguments(p, g)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = workflow_config(args)
    seeds = args.seeds
    res = debias(cfg, backbone_epochs=args.backbone_epochs, backbone_max_steps=args.backbone_max_steps,
                 upstream_epochs=args.upstream_epochs, upstream_max_steps=args.upstream_max_steps,
                 counterfactual=args.counterfactual, transfer_csv=args.transfer_csv, seeds=seeds,
                 control=args.control)
    return print_results("debias", res["out_dir"])

"""The base every workflow command stands on, so no workflow imports another.

One place runs a config (``run_config``), derives one (``derive``), builds a workflow's data
(``datasets_for``, the trainer's builder: the backbone's normalization and ``data_seed``),
builds a model (``build_model``), predicts, splits data (``Subset``, ``half_split``), pre-trains
and caches the tiny backbone (``pretrained_backbone``), summarizes seeds with the sample std and
calls a difference within the seed spread a tie. Heavy modules (torch, timm, the trainer) are
imported inside the functions that need them, so a workflow's ``--help`` parses at once.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import statistics
from pathlib import Path

from ..config import TrainConfig

# -- configs and runs ----------------------------------------------------------------------------


def derive(base: TrainConfig, **changes) -> TrainConfig:
    """``base`` with ``changes`` (config keys), validated; ``base`` is left as it was."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}")
    return dataclasses.replace(base, **changes).validate()


def run_config(cfg: TrainConfig, **train_kwargs) -> dict:
    """Train ``cfg``: the one place the workflows start a run. Same arguments and result as
    ``fastfair.trainer.train`` (looked up at call time, so a test can watch it)."""
    from .. import trainer

    return trainer.train(cfg, **train_kwargs)


def datasets_for(cfg: TrainConfig, **changes) -> dict:
    """``{"train", "val", "test"}`` of ``derive(cfg, **changes)`` through the trainer's builder:
    normalized for the config's backbone, split and colored by ``data_seed`` (else ``seed``)."""
    from ..trainer import build_datasets_for

    return build_datasets_for(derive(cfg, **changes) if changes else cfg)


def build_model(cfg: TrainConfig, num_classes: int, weights=None):
    """A fresh backbone with a ``num_classes`` head, initialized from ``cfg.seed`` whatever ran
    before; ``weights`` (a weights file) replace the body and the head is drawn anew, since a
    source task's head means nothing for the target."""
    import torch

    from ..models import create_backbone, load_backbone_weights

    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg, num_classes)
    if weights is not None:
        load_backbone_weights(model, weights)
        model.reset_classifier(num_classes)
    return model


# -- data and prediction -------------------------------------------------------------------------


def _subset_class():
    import torch

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

    return Subset


def __getattr__(name):
    # Subset subclasses torch's Dataset: built on first use so importing this module stays light
    if name == "Subset":
        globals()["Subset"] = cls = _subset_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def half_split(ds, seed: int):
    """Item indices of two halves of ``ds`` that share no source image (``ds.source_index``)."""
    import torch

    src = torch.as_tensor(ds.source_index)
    uniq = torch.unique(src)
    perm = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    first = torch.isin(src, perm[: len(uniq) // 2])
    return first.nonzero().flatten(), (~first).nonzero().flatten()


def stack_images(ds):
    """All images and labels of ``ds`` as two tensors."""
    import torch
    from torch.utils.data import DataLoader

    images, labels = [], []
    for x, y, _ in DataLoader(ds, batch_size=512):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def predict(model, images, batch_size: int = 256):
    """Arg-max predictions of ``model`` on a tensor of images, in eval mode (mode restored)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        preds = [model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


# -- the pre-trained tiny backbone ---------------------------------------------------------------

# The documented pre-training (docs/reproducing.md): the whole tiny ViT on 10-class colored digits
# with uniform colors, so it learns shapes that LoRA can adapt; the architecture is the caller's.
PRETRAIN = dict(finetune="full", method="erm", lam=0.0, binary=False, correlation=0.1, repeats=2,
                epochs=6, max_steps=None, lr=1e-3, batch_size=64, seed=0, select_by=None, data="colored_digits",
                checkpoint=None, pretrained=False, log_with=None, report_ci=False, save_every=0)
ARCH_KEYS = ("model", "img_size", "patch_size", "depth", "model_kwargs", "attn")


def cache_dir() -> Path:
    """``$FASTFAIR_CACHE_DIR``, else ``fastfair`` under the user's cache directory."""
    if os.environ.get("FASTFAIR_CACHE_DIR"):
        return Path(os.environ["FASTFAIR_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fastfair"


def pretrain_config(cfg: TrainConfig, **changes) -> TrainConfig:
    """The pre-training run for ``cfg``'s architecture; its data seed is ``cfg.data_seed`` (0
    when unset), which the fine-tuning must then share so no test image was a pre-training one."""
    keep = {k: getattr(cfg, k) for k in ARCH_KEYS}
    return derive(TrainConfig(), **{**PRETRAIN, **keep, "data_seed": pretrain_data_seed(cfg), **changes})


def pretrain_data_seed(cfg: TrainConfig) -> int:
    return 0 if cfg.data_seed is None else cfg.data_seed


def pretrained_backbone(cfg: TrainConfig, **changes) -> Path:
    """The weights file of the tiny backbone pre-trained as the docs do, for ``cfg``'s architecture.

    Trained on first use and cached under ``cache_dir()/pretrain/<key>``, ``key`` a hash of the
    pre-training config (``changes`` override it, e.g. ``max_steps`` in tests), so any change
    trains anew and the same config is reused. A killed pre-training leaves no half entry: it
    trains in ``<key>.partial`` and is renamed when done.
    """
    from accelerate import PartialState

    pcfg = pretrain_config(cfg, **changes)
    values = {k: v for k, v in pcfg.to_dict().items() if k != "output_dir"}
    key = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
    final = cache_dir() / "pretrain" / key
    weights = final / "model" / "model.safetensors"
    if weights.is_file():
        return weights
    state = PartialState()
    partial = final.with_name(key + ".partial")
    if state.is_main_process and partial.exists():
        import shutil

        shutil.rmtree(partial)  # a killed pre-training: start it over
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"fastfair: pre-training the {pcfg.model} backbone once ({pcfg.epochs} epochs), "
              f"cached in {final}", flush=True)
    run_config(derive(pcfg, output_dir=str(partial)))
    if state.is_main_process:
        os.replace(partial, final)
    state.wait_for_everyone()
    return weights


def with_backbone(cfg: TrainConfig, backbone: str | None, **pretrain_changes) -> TrainConfig:
    """``cfg`` for ``--backbone``: ``None``/``"config"`` keep it; ``"pretrain"`` loads the cached
    pre-trained tiny backbone (training it first if needed) and fixes the data seed to the
    pre-training's, so seeds vary initialization and order but never leak pre-training images."""
    if backbone in (None, "config"):
        return cfg
    if backbone != "pretrain":
        raise ValueError(f"--backbone must be 'config' or 'pretrain', got {backbone!r}")
    if cfg.pretrained or cfg.checkpoint:
        raise ValueError("--backbone pretrain replaces the backbone weights: drop --pretrained/--checkpoint")
    weights = pretrained_backbone(cfg, **pretrain_changes)
    return derive(cfg, checkpoint=str(weights), data_seed=pretrain_data_seed(cfg))


def add_backbone_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", choices=("config", "pretrain"), default="config",
                        help="'pretrain': pre-train the tiny backbone as docs/reproducing.md does "
                             "(cached under $FASTFAIR_CACHE_DIR or ~/.cache/fastfair, reused) and "
                             "start from it, with the data seed fixed to the pre-training's (0 unless "
                             "--data-seed); 'config': the config's own backbone (default: %(default)s)")


# -- progress headers ----------------------------------------------------------------------------


class Phases:
    """Numbered phase headers of a workflow on the main process: ``[debias 2/5] upstream adapter, seed 1``."""

    def __init__(self, workflow: str, total: int):
        self.workflow, self.total, self.done = workflow, total, 0

    def __call__(self, text: str) -> None:
        from accelerate import PartialState

        self.done += 1
        if PartialState().is_main_process:
            print(f"[{self.workflow} {self.done}/{self.total}] {text}", flush=True)


# -- flags, tables, seeds ------------------------------------------------------------------------


def comma_list(kind):
    """An argparse type for ``--flag 1,4,16``."""
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from e
    return parse


def fmt_mean_std(mean, std, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def write_rows(out_dir: Path, rows: list[dict], payload: dict) -> None:
    """``results.csv`` (one row per run) and ``results.json`` (``payload`` plus the rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and *sample* standard deviation (``None`` with fewer than two values), NaN/None left out."""
    v = _finite(values)
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def summarize_seeds(rows: list[dict], keys: tuple[str, ...], metrics) -> list[dict]:
    """One row per distinct ``keys`` tuple (first-seen order): each metric's mean over seeds and
    its sample standard deviation (``None`` with one seed); missing or NaN values are left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, sel in groups.items():
        s = {**dict(zip(keys, key)), "n_seeds": len(sel)}
        for m in metrics:
            s[m], s[m + "_std"] = mean_std(r.get(m) for r in sel)
        out.append(s)
    return out


TIE_RULE = "a difference smaller than the seed spread (sample std over seeds) is called a tie"


def verdict(diff: float | None, spread: float | None, higher_is_better: bool = True) -> str:
    """``"better"``, ``"worse"`` or ``"tie"`` for a mean difference against its seed spread;
    ``"one seed"`` when the spread is unknown, so no difference is established."""
    if diff is None:
        return "n/a"
    if spread is None:
        return "one seed"
    if abs(diff) <= spread:
        return "tie"
    return "better" if (diff > 0) == higher_is_better else "worse"

"""Datasets: the embedded colored-digits benchmark and image folders described by a CSV.

Every dataset yields ``(image, label, group)`` (a float ``3×H×W`` tensor and two ints) and
exposes ``num_classes``, ``num_groups``, ``group_names`` and LongTensors ``labels``, ``groups``.
``validate_dataset`` checks those once, so the training step need not.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch.utils.data import WeightedRandomSampler

from .colored_digits import (
    COLOR_NAMES, PALETTE, ColoredDigits, colored_digits_splits, colorize, digit_mask, other_colors, recolor,
)
from .csv_dataset import CSVImageDataset, canonical_split
from .triggers import TriggeredDataset, add_trigger, trigger_pattern, trigger_region

DATA_KINDS = ("colored_digits", "csv")
SPLITS = ("train", "val", "test")

__all__ = [
    "COLOR_NAMES", "DATA_KINDS", "PALETTE", "CSVImageDataset", "ColoredDigits", "TriggeredDataset",
    "add_trigger", "build_datasets", "canonical_split", "colored_digits_splits", "colorize", "digit_mask",
    "group_balanced_sampler", "other_colors", "recolor", "trigger_pattern", "trigger_region",
    "validate_dataset",
]


def _params(cls) -> list[str]:
    return [p for p in inspect.signature(cls).parameters if p != "split"]


def build_datasets(cfg=None, /, **kwargs) -> dict:
    """``{"train", "val", "test"}`` datasets, each checked by ``validate_dataset``.

    ``cfg``: a mapping or an object with attributes (argparse namespace, dataclass) holding
    ``data`` (``"colored_digits"``, the default, or ``"csv"``) and the options of
    ``ColoredDigits`` or ``CSVImageDataset`` (``csv_path``, ``image_root``, column names, ...),
    plus ``verify_images`` (default True; False only checks that image files exist). Keys of
    ``cfg`` that are not data options are ignored, so a whole training config can be passed;
    ``kwargs`` override ``cfg``, and without ``cfg`` an unknown keyword is an error.
    """
    if cfg is None:
        opts = {}
    elif isinstance(cfg, Mapping):
        opts = dict(cfg)
    else:
        opts = dict(vars(cfg))
    opts.update(kwargs)
    kind = opts.pop("data", None) or "colored_digits"
    if kind not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {kind!r}")
    verify_images = opts.pop("verify_images", True)
    cls = ColoredDigits if kind == "colored_digits" else CSVImageDataset
    known = _params(cls)
    if cfg is None:
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for data={kind!r}; accepted: {known}")
    opts = {k: v for k, v in opts.items() if k in known}
    if kind == "csv" and not opts.get("csv_path"):
        raise ValueError("data='csv' needs csv_path (and usually image_root)")
    out = {}
    for split in SPLITS:
        out[split] = cls(split=split, **opts)
        validate_dataset(out[split], verify_images=verify_images)
    return out


def _describe(ds, index: int) -> str:
    return ds.describe_row(index) if hasattr(ds, "describe_row") else f"item {index}"


def validate_dataset(ds, verify_images: bool = True) -> None:
    """Check once that labels lie in [0, num_classes) and groups in [0, num_groups).

    The error names the offending row. A dataset with its own ``validate`` (``CSVImageDataset``)
    also has its files checked, opening each image header unless ``verify_images=False``.
    """
    missing = [a for a in ("num_classes", "num_groups", "labels", "groups") if not hasattr(ds, a)]
    if missing:
        raise ValueError(f"{type(ds).__name__} lacks {missing}: fastfair datasets expose num_classes, "
                         "num_groups, labels and groups")
    n = len(ds)
    if n == 0:
        raise ValueError(f"{type(ds).__name__} is empty")
    for name, count in (("labels", ds.num_classes), ("groups", ds.num_groups)):
        values = torch.as_tensor(getattr(ds, name))
        if values.dim() != 1 or len(values) != n:
            raise ValueError(f"{name} must be 1-D with one entry per item ({n}), got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must be integers, got dtype {values.dtype}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"num_{'classes' if name == 'labels' else 'groups'} must be a positive integer, "
                             f"got {count!r}")
        bad = ((values < 0) | (values >= count)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{name[:-1]} {int(values[i])} out of range [0, {count}) at {_describe(ds, i)}")
    names = getattr(ds, "group_names", None)
    if names is not None and len(names) != ds.num_groups:
        raise ValueError(f"group_names has {len(names)} entries but num_groups={ds.num_groups}")
    if hasattr(ds, "validate"):
        ds.validate(verify_images=verify_images)


def group_balanced_sampler(ds, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """Samples with replacement so that every group present in ``ds`` is drawn equally often.

    Each item weighs ``1 / count(its group)``; ``num_samples`` defaults to ``len(ds)``.
    """
    groups = torch.as_tensor(ds.groups, dtype=torch.long)
    if len(groups) == 0:
        raise ValueError("cannot sample from an empty dataset")
    if int(groups.min()) < 0:
        i = int((groups < 0).nonzero()[0])
        raise ValueError(f"group {int(groups[i])} is negative at {_describe(ds, i)}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    counts = torch.bincount(groups)
    weights = 1.0 / counts[groups].double()
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(groups), replacement=True, generator=g)

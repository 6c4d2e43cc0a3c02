"""Datasets: the embedded colored-digits benchmark and image folders described by a CSV.

Every dataset yields ``(image, label, group)`` (a float ``3×H×W`` tensor and two ints) and
exposes ``num_classes``, ``num_groups``, ``group_names`` and LongTensors ``labels``, ``groups``.
``validate_dataset`` checks one of them and ``validate_splits`` the three together, once,
so the training step need not. Bad data is a ``DataError`` (a ``ValueError``) naming the rows.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch.utils.data import WeightedRandomSampler

from ._checks import DataError, DataWarning
from .colored_digits import (
    COLOR_NAMES, PALETTE, ColoredDigits, colored_digits_splits, colorize, digit_mask, other_colors, recolor,
)
from .csv_dataset import CSVImageDataset, canonical_split
from .images import VERIFY_MODES, verify_mode
from .triggers import TriggeredDataset, add_trigger, trigger_pattern, trigger_region
from .validation import describe, validate_dataset, validate_splits

DATA_KINDS = ("colored_digits", "csv")
SPLITS = ("train", "val", "test")
_BUILDERS = {"colored_digits": ColoredDigits, "csv": CSVImageDataset}

__all__ = [
    "COLOR_NAMES", "DATA_KINDS", "PALETTE", "VERIFY_MODES", "CSVImageDataset", "ColoredDigits", "DataError",
    "DataWarning", "TriggeredDataset", "add_trigger", "build_datasets", "canonical_split", "colored_digits_splits",
    "colorize", "digit_mask", "group_balanced_sampler", "other_colors", "recolor", "trigger_pattern",
    "trigger_region", "validate_dataset", "validate_splits",
]


def _params(cls) -> list[str]:
    return [p for p in inspect.signature(cls).parameters if p != "split"]


def build_datasets(cfg=None, /, **kwargs) -> dict:
    """``{"train", "val", "test"}`` datasets, checked as a whole by ``validate_splits``.

    ``cfg``: a mapping or an object with attributes (argparse namespace, dataclass) holding
    ``data`` (``"colored_digits"``, the default, or ``"csv"``) and the options of
    ``ColoredDigits`` or ``CSVImageDataset`` (``csv_path``, ``image_root``, column names,
    ``allow_outside_root``, ...), plus ``verify_images`` (``"auto"``, the default: every image
    decoded below 100k images, a sample above; ``"full"``, ``"sample"``, ``"none"``; True/False
    mean full/none). Keys of ``cfg`` that are not data options are ignored, so a whole training
    config can be passed; ``kwargs`` override ``cfg``, and without ``cfg`` an unknown keyword is
    an error. Bad data raises ``DataError`` (a ``ValueError``) before anything is returned.
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
        raise DataError(f"data must be one of {DATA_KINDS}, got {kind!r}")
    verify_images = opts.pop("verify_images", "auto")
    verify_mode(verify_images, 0)  # a bad option fails before the CSV is read
    if kind != "csv":  # only CSV paths can leave a root; the trainer refuses the flag elsewhere
        opts.pop("allow_outside_root", None)
    cls = _BUILDERS[kind]
    known = _params(cls)
    if cfg is None:
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise DataError(f"unknown option(s) {unknown} for data={kind!r}; accepted: {known}")
    opts = {k: v for k, v in opts.items() if k in known}
    if kind == "csv":
        if not opts.get("csv_path"):
            raise DataError("data='csv' needs csv_path (and usually image_root)")
        full = CSVImageDataset(**opts)  # the CSV is read and checked once, then split
        out = {split: full.select(split) for split in SPLITS}
    else:
        out = {split: cls(split=split, **opts) for split in SPLITS}
    validate_splits(out, verify_images=verify_images)
    return out


def group_balanced_sampler(ds, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """Samples with replacement so that every group present in ``ds`` is drawn equally often.

    Each item weighs ``1 / count(its group)``; ``num_samples`` defaults to ``len(ds)``.
    """
    groups = torch.as_tensor(ds.groups, dtype=torch.long)
    if len(groups) == 0:
        raise ValueError("cannot sample from an empty dataset")
    if int(groups.min()) < 0:
        i = int((groups < 0).nonzero()[0])
        raise DataError(f"group {int(groups[i])} is negative at {describe(ds, i)}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    counts = torch.bincount(groups)
    weights = 1.0 / counts[groups].double()
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(groups), replacement=True, generator=g)

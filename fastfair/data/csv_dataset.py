"""Image datasets described by a metadata CSV: ``path,label,group[,split]`` and an image root.

This one format covers CelebA, Waterbirds, Fitzpatrick17k, HAM10000 and CheXpert once their own
metadata is turned into those columns (recipes in docs/datasets.md). Everything about the CSV
is checked when the dataset is built and the files by ``validate()``, so bad data stops the run
with the CSV line to fix, not a crash some steps into training.
"""
from __future__ import annotations

import csv
import math
import os

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms

# CelebA's list_eval_partition numbers its splits 0/1/2.
SPLIT_ALIASES = {
    "train": "train", "training": "train", "0": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val", "1": "val",
    "test": "test", "testing": "test", "2": "test",
}


def canonical_split(value) -> str | None:
    """``"train"``, ``"val"`` or ``"test"`` for a split name or alias, else None."""
    return SPLIT_ALIASES.get(str(value).strip().lower())


def _as_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        pass
    try:  # pandas writes integer columns holding a NaN as floats: "3.0"
        f = float(value)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def _encode(values: list[str], lines: list[int], column: str, count_name: str, declared: int | None, where: str):
    """Integer codes, their count and names for one column (integers, or strings sorted)."""
    ints = [_as_int(v) for v in values]
    is_int = [i is not None for i in ints]
    if all(is_int):
        for v, line in zip(ints, lines):
            if v < 0:
                raise ValueError(f"{where} line {line}: column {column!r} has {v}; it must be >= 0")
            if declared is not None and v >= declared:
                raise ValueError(f"{where} line {line}: column {column!r} has {v}, out of range "
                                 f"[0, {declared}) for {count_name}={declared}")
        n = declared if declared is not None else max(ints) + 1
        return ints, n, [str(i) for i in range(n)]
    if any(is_int):
        a, b = is_int.index(True), is_int.index(False)
        raise ValueError(f"{where}: column {column!r} mixes integers and strings: line {lines[a]} has "
                         f"{values[a]!r}, line {lines[b]} has {values[b]!r}")
    names = sorted(set(values))
    if declared is not None and len(names) > declared:
        raise ValueError(f"{where}: column {column!r} has {len(names)} distinct values {names[:20]} "
                         f"but {count_name}={declared}")
    code = {name: i for i, name in enumerate(names)}
    n = declared if declared is not None else len(names)
    return [code[v] for v in values], n, names + [str(i) for i in range(len(names), n)]


class CSVImageDataset(Dataset):
    """Images listed in a metadata CSV; items are ``(image, label, group)``.

    ``image_root``: folder the ``path`` column is relative to (default: the CSV's folder);
    absolute paths are kept. ``split``: keep only rows whose ``split_col`` is that split
    (aliases: valid/validation/dev, 0/1/2 as in CelebA's list_eval_partition); None keeps all.
    Labels and groups are integers, or strings numbered in sorted order; the numbering and
    ``num_classes``/``num_groups`` come from all rows of the CSV, so every split agrees.
    ``group_col=None``: one group. ``transform``: PIL image → tensor, replacing the default
    resize to ``image_size×image_size``, ``ToTensor`` and normalization with ``mean``/``std``.

    Attributes: ``num_classes``, ``num_groups``, ``class_names``, ``group_names``, LongTensors
    ``labels`` and ``groups``, and per row ``paths`` and ``lines`` (CSV line numbers).
    """

    def __init__(
        self,
        csv_path,
        image_root=None,
        split: str | None = None,
        path_col: str = "path",
        label_col: str = "label",
        group_col: str | None = "group",
        split_col: str = "split",
        image_size: int = 224,
        transform=None,
        num_classes: int | None = None,
        num_groups: int | None = None,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    ):
        self.csv_path = str(csv_path)
        where = self.csv_path
        if not os.path.isfile(where):
            raise ValueError(f"metadata CSV not found: {where}")
        for name, value in (("num_classes", num_classes), ("num_groups", num_groups)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if split is not None and canonical_split(split) is None:
            raise ValueError(f"split must be train/val/test or an alias {sorted(SPLIT_ALIASES)}, got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.image_root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(where))
        self.split = canonical_split(split) if split is not None else None

        with open(where, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise ValueError(f"{where} is empty: expected a header line with columns "
                                 f"{path_col!r}, {label_col!r}, {group_col!r}")
            needed = [c for c in (path_col, label_col, group_col) if c is not None]
            needed += [split_col] if split is not None else []
            for col in needed:
                if col not in header:
                    raise ValueError(f"{where}: column {col!r} not found; columns present: {header}")
            rows, lines = [], []
            for row in reader:
                lines.append(reader.line_num)
                for col in needed:
                    if row.get(col) is None or not row[col].strip():
                        raise ValueError(f"{where} line {reader.line_num}: empty or missing value in column {col!r}")
                rows.append(row)
        if not rows:
            raise ValueError(f"{where} has a header but no data rows")

        labels, self.num_classes, self.class_names = _encode(
            [r[label_col].strip() for r in rows], lines, label_col, "num_classes", num_classes, where)
        if group_col is None:
            if num_groups not in (None, 1):
                raise ValueError(f"group_col=None means one group, but num_groups={num_groups}")
            groups, self.num_groups, self.group_names = [0] * len(rows), 1, ["all"]
        else:
            groups, self.num_groups, self.group_names = _encode(
                [r[group_col].strip() for r in rows], lines, group_col, "num_groups", num_groups, where)

        keep = range(len(rows))
        if split is not None:
            splits = []
            for row, line in zip(rows, lines):
                s = canonical_split(row[split_col])
                if s is None:
                    raise ValueError(f"{where} line {line}: unknown split {row[split_col]!r} in column "
                                     f"{split_col!r}; use train/val/test or {sorted(SPLIT_ALIASES)}")
                splits.append(s)
            keep = [i for i, s in enumerate(splits) if s == self.split]
            if not keep:
                raise ValueError(f"{where}: split {self.split!r} is empty (column {split_col!r} has "
                                 f"{sorted(set(splits))})")
        self.paths = [os.path.join(self.image_root, rows[i][path_col].strip()) for i in keep]
        self.lines = [lines[i] for i in keep]
        self.labels = torch.tensor([labels[i] for i in keep], dtype=torch.long)
        self.groups = torch.tensor([groups[i] for i in keep], dtype=torch.long)
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = transform if transform is not None else transforms.Compose([
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def describe_row(self, index: int) -> str:
        return f"{self.csv_path} line {self.lines[index]} ({self.paths[index]})"

    def validate(self, verify_images: bool = True) -> None:
        """Check every image exists and, with ``verify_images``, that PIL can read its header.

        ``verify_images=False`` only checks that the files exist, for datasets too large to open.
        """
        for i, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise ValueError(f"{self.csv_path} line {self.lines[i]}: image file not found: {path}")
            if verify_images:
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:
                    raise ValueError(f"{self.csv_path} line {self.lines[i]}: cannot read image {path}: {e}") from e

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                image = self.transform(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"{self.csv_path} line {self.lines[index]}: cannot load image {path}: {e}") from e
        return image, int(self.labels[index]), int(self.groups[index])

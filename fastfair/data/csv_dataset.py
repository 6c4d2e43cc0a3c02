"""Image datasets described by a metadata CSV: ``path,label,group[,split]`` and an image root.

This one format covers CelebA, Waterbirds, Fitzpatrick17k, HAM10000 and CheXpert once their own
metadata is turned into those columns (recipes in docs/datasets.md). Everything about the CSV
is checked when the dataset is built and the files by ``validate()``, so bad data stops the run
with the CSV lines to fix (all of them, or the first 20 and their count), not a crash some
steps into training.
"""
from __future__ import annotations

import copy
import csv
import io
import os
import re
from collections import Counter
from typing import NamedTuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms

from ._checks import MAX_DECLARED, MAX_LISTED, DataError, check_image_size, check_mean_std, listing, warn
from .images import check_image_files, raise_problems, verify_mode

# CelebA's list_eval_partition numbers its splits 0/1/2.
SPLIT_ALIASES = {
    "train": "train", "training": "train", "0": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val", "1": "val",
    "test": "test", "testing": "test", "2": "test",
}


def canonical_split(value) -> str | None:
    """``"train"``, ``"val"`` or ``"test"`` for a split name or alias, else None."""
    return SPLIT_ALIASES.get(str(value).strip().lower())


# "3", and "3.0" as pandas writes an integer column that holds a NaN; nothing else (no "1e9",
# "1_000" or non-ASCII digits, which int() would accept)
INTEGER = re.compile(r"[+-]?[0-9]+(?:\.0*)?")


def _as_int(value: str) -> int | None:
    return int(value.split(".")[0]) if INTEGER.fullmatch(value) else None


def _read_csv(where: str) -> tuple[list[str] | None, list[list[str]], list[int]]:
    """Header, non-blank rows and the line each row ends on; decoding errors name the line."""
    with open(where, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{where} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                        "save the CSV as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        header = next(reader, None)
        for row in reader:
            if row:
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{where} line {reader.line_num}: {e}") from e
    return header, rows, lines


def _column_index(header: list[str] | None, needed: list[str], where: str) -> dict[str, int]:
    """Position of each needed column; duplicate names are refused (a reader keeps only one)."""
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{where} is empty: expected a header line with columns {needed}")
    counts = Counter(h for h in header if h.strip())
    dups = [f"{h!r} (columns {[i + 1 for i, x in enumerate(header) if x == h]})" for h, c in counts.items() if c > 1]
    if dups:
        raise DataError(f"{where} line 1: duplicate column names {', '.join(dups)}; which copy is meant is "
                        "ambiguous, so rename or drop the others")
    for col in needed:
        if col not in header:
            raise DataError(f"{where}: column {col!r} not found; columns present: {header}")
    return {col: header.index(col) for col in needed}


def _encode(values: list[str], lines: list[int], column: str, count_name: str, declared: int | None, where: str):
    """Integer codes, their count K and names for one column.

    Integers must lie in [0, K): K is ``declared`` if given, else ``max + 1``, which may not
    exceed the number of rows (so a stray ``1000000000`` cannot ask for a billion classes).
    Strings are numbered 0..K-1 in sorted (code point) order. A mix of both is an error, so a
    typo in an integer column cannot become a class of its own.
    """
    ints = [_as_int(v) for v in values]
    strings = [i for i, x in enumerate(ints) if x is None]
    rows = lambda idx: [f"line {lines[i]} ({values[i]!r})" for i in idx[:MAX_LISTED]]  # noqa: E731
    if strings and len(strings) < len(values):
        numbers = [i for i, x in enumerate(ints) if x is not None]
        raise DataError(f"{where}: column {column!r} mixes integers and strings: integers in "
                        f"{listing(rows(numbers), total=len(numbers))}; strings in "
                        f"{listing(rows(strings), total=len(strings))}")
    if not strings:
        limit = declared if declared is not None else len(values)
        bad = [i for i, x in enumerate(ints) if not 0 <= x < limit]
        if bad:
            why = (f"{count_name}={declared}" if declared is not None else
                   f"K = max + 1 may not exceed the {len(values)} rows of the CSV; pass {count_name} to declare more")
            raise DataError(f"{where}: column {column!r} must hold integers 0..K-1 ({why}); out of range in "
                            + listing([f"line {lines[i]} ({values[i]})" for i in bad[:MAX_LISTED]], total=len(bad)))
        k = declared if declared is not None else max(ints) + 1
        if declared is None:
            absent = sorted(set(range(k)) - set(ints))
            if absent:
                warn(f"{where}: column {column!r} numbers {k} values 0..{k - 1} but "
                     f"{listing([str(v) for v in absent[:MAX_LISTED]], 'value', len(absent))} have no rows")
        return ints, k, [str(i) for i in range(k)]
    names = sorted(set(values))
    if declared is not None and len(names) > declared:
        raise DataError(f"{where}: column {column!r} has {len(names)} distinct values {names[:MAX_LISTED]} "
                        f"but {count_name}={declared}")
    code = {name: i for i, name in enumerate(names)}
    n = declared if declared is not None else len(names)
    return [code[v] for v in values], n, names + [str(i) for i in range(len(names), n)]


def _image_paths(raw: list[str], lines: list[int], root: str, allow_outside_root: bool, where: str) -> list[str]:
    """Absolute, normalized paths; those leaving ``root`` are refused unless allowed."""
    base = os.path.abspath(root)
    paths, outside = [], []
    for p, line in zip(raw, lines):
        full = os.path.normpath(os.path.join(base, p))  # an absolute p replaces base
        # lexical on purpose: a symlink inside the root is the user's own choice
        if not allow_outside_root and os.path.commonpath([base, full]) != base:
            outside.append(f"line {line} ({p!r})")
        paths.append(full)
    if outside:
        raise DataError(f"{where}: image paths outside image_root {base} (absolute, or climbing out with '..') "
                        "are refused unless allow_outside_root=True (--allow-outside-root); " + listing(outside))
    return paths


def _check_arguments(split, *, allow_outside_root, **named) -> None:
    for name in ("num_classes", "num_groups"):
        value = named[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= MAX_DECLARED):
            raise DataError(f"{name} must be None or an integer in [1, {MAX_DECLARED}], got {value!r}")
    if split is not None and canonical_split(split) is None:
        raise DataError(f"split must be train/val/test or an alias {sorted(SPLIT_ALIASES)}, got {split!r}")
    for name in ("path_col", "label_col", "group_col", "split_col"):
        value = named[name]
        if not (isinstance(value, str) and value) and not (name == "group_col" and value is None):
            raise DataError(f"{name} must be a column name{' or None' if name == 'group_col' else ''}, got {value!r}")
    if not isinstance(allow_outside_root, bool):
        raise DataError(f"allow_outside_root must be True or False, got {allow_outside_root!r}")


class _Table(NamedTuple):
    """Every row of the CSV, already checked; a dataset is a selection of its rows."""

    paths: list[str]
    lines: list[int]
    labels: list[int]
    groups: list[int]
    splits: list[str] | None  # the split column as written, None when there is none


class CSVImageDataset(Dataset):
    """Images listed in a metadata CSV; items are ``(image, label, group)``.

    ``image_root``: folder the ``path`` column is relative to (default: the CSV's folder); paths
    that leave it (absolute, or with ``..``) are refused unless ``allow_outside_root``.
    ``split``: keep only rows whose ``split_col`` is that split (aliases: valid/validation/dev,
    0/1/2 as in CelebA's list_eval_partition); None keeps all (``select`` picks one later).
    Labels and groups are integers 0..K-1, or strings numbered in sorted order; the numbering
    and ``num_classes``/``num_groups`` come from all rows of the CSV, so every split agrees.
    ``group_col=None``: one group. ``transform``: PIL image → tensor, replacing the default
    resize to ``image_size×image_size``, ``ToTensor`` and normalization with ``mean``/``std``.
    The rules are in docs/datasets.md; a broken rule is a ``DataError`` naming the CSV lines.

    Attributes: ``num_classes``, ``num_groups``, ``class_names``, ``group_names``, LongTensors
    ``labels`` and ``groups``, and per row ``paths`` (absolute) and ``lines`` (CSV line numbers).
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
        allow_outside_root: bool = False,
    ):
        self.csv_path = where = str(csv_path)
        if not os.path.isfile(where):
            raise DataError(f"metadata CSV not found: {where}")
        _check_arguments(split, num_classes=num_classes, num_groups=num_groups, path_col=path_col,
                         label_col=label_col, group_col=group_col, split_col=split_col,
                         allow_outside_root=allow_outside_root)
        image_size = check_image_size(image_size)
        self.mean, self.std = check_mean_std(mean, std)
        self.image_root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(where))
        if not os.path.isdir(self.image_root):
            raise DataError(f"image_root is not a folder: {self.image_root} (the paths in {where} are relative to it)")
        self.split_col = split_col
        self._table = self._read(path_col, label_col, group_col, num_classes, num_groups, allow_outside_root)
        self.split = canonical_split(split) if split is not None else None
        self._keep(range(len(self._table.paths)) if split is None else self._split_rows(self.split))
        self.transform = transform if transform is not None else transforms.Compose([
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def _read(self, path_col, label_col, group_col, num_classes, num_groups, allow_outside_root) -> _Table:
        where = self.csv_path
        header, rows, lines = _read_csv(where)
        cols = _column_index(header, [c for c in (path_col, label_col, group_col) if c is not None], where)
        empty = [f"line {line} column {c!r}" for row, line in zip(rows, lines)
                 for c, j in cols.items() if j >= len(row) or not row[j].strip()]
        if empty:
            raise DataError(f"{where}: empty or missing values in " + listing(empty, "place"))
        if not rows:
            raise DataError(f"{where} has a header but no data rows")

        def column(name):
            return [row[cols[name]].strip() for row in rows]

        labels, self.num_classes, self.class_names = _encode(
            column(label_col), lines, label_col, "num_classes", num_classes, where)
        if group_col is None:
            if num_groups not in (None, 1):
                raise DataError(f"group_col=None means one group, but num_groups={num_groups}")
            groups, self.num_groups, self.group_names = [0] * len(rows), 1, ["all"]
        else:
            groups, self.num_groups, self.group_names = _encode(
                column(group_col), lines, group_col, "num_groups", num_groups, where)
        paths = _image_paths(column(path_col), lines, self.image_root, allow_outside_root, where)
        self._header = header
        s = header.index(self.split_col) if self.split_col in header else None
        splits = None if s is None else [row[s].strip() if s < len(row) else "" for row in rows]
        return _Table(paths, lines, labels, groups, splits)

    def _split_rows(self, split: str) -> list[int]:
        where, splits = self.csv_path, self._table.splits
        if splits is None:
            raise DataError(f"{where}: column {self.split_col!r} not found; columns present: {self._header}")
        names = [canonical_split(s) for s in splits]
        unknown = [f"line {line} ({s!r})" for s, c, line in zip(splits, names, self._table.lines) if c is None]
        if unknown:
            raise DataError(f"{where}: unknown split in column {self.split_col!r} (use train/val/test or "
                            f"{sorted(SPLIT_ALIASES)}); " + listing(unknown))
        keep = [i for i, c in enumerate(names) if c == split]
        if not keep:
            raise DataError(f"{where}: split {split!r} is empty (column {self.split_col!r} has {sorted(set(names))})")
        return keep

    def _keep(self, rows) -> None:
        t = self._table
        self.paths = [t.paths[i] for i in rows]
        self.lines = [t.lines[i] for i in rows]
        self.labels = torch.tensor([t.labels[i] for i in rows], dtype=torch.long)
        self.groups = torch.tensor([t.groups[i] for i in rows], dtype=torch.long)

    def select(self, split: str) -> "CSVImageDataset":
        """The rows of the whole CSV in ``split``, with this dataset's numbering and settings."""
        name = canonical_split(split)
        if name is None:
            raise DataError(f"split must be train/val/test or an alias {sorted(SPLIT_ALIASES)}, got {split!r}")
        view = copy.copy(self)
        view.split = name
        view._keep(self._split_rows(name))
        return view

    def __len__(self) -> int:
        return len(self.paths)

    def describe_row(self, index: int) -> str:
        return f"{self.csv_path} line {self.lines[index]} ({self.paths[index]})"

    def image_files(self) -> dict[str, str]:
        """Each distinct image path, with the first CSV line that lists it."""
        files: dict[str, str] = {}
        for path, line in zip(self.paths, self.lines):
            files.setdefault(path, f"line {line}")
        return files

    def validate(self, verify_images="auto", progress: bool = True) -> None:
        """Check that every image exists and, by ``verify_images``, decodes in full.

        ``"full"`` decodes every image once, ``"sample"`` a seeded sample, ``"none"`` only checks
        that the files exist, ``"auto"`` is full below 100k images; True/False mean full/none.
        All missing and broken files are listed in one ``DataError``.
        """
        files = self.image_files()
        mode = verify_mode(verify_images, len(files))
        raise_problems(check_image_files(files, mode, self.csv_path, progress))

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                image = self.transform(im.convert("RGB"))
        except Exception as e:
            raise DataError(f"{self.csv_path} line {self.lines[index]}: cannot load image {path}: {e}") from e
        return image, int(self.labels[index]), int(self.groups[index])

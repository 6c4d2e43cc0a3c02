"""Checks of datasets as the trainer sees them: one split (``validate_dataset``) and the three
splits together (``validate_splits``), before any model is built.

Errors that make training impossible or meaningless raise ``DataError`` (collected, so one run
lists every problem); things that are probably mistakes but can be trained on (an image in two
splits, repeated rows, a group seen only in evaluation) are ``DataWarning``s with their counts.
"""
from __future__ import annotations

import difflib

import torch

from ._checks import MAX_LISTED, DataError, listing, warn
from .images import check_image_files, raise_problems, verify_mode

SPLITS = ("train", "val", "test")
# attribute of the values, attribute of their count, what one value is called in messages
_COLUMNS = (("labels", "num_classes", "label", "class_names"), ("groups", "num_groups", "group", "group_names"))


def describe(ds, index: int) -> str:
    return ds.describe_row(index) if hasattr(ds, "describe_row") else f"item {index}"


def _check_values(ds, values_attr: str, count_attr: str, what: str) -> None:
    n, count = len(ds), getattr(ds, count_attr)
    values = torch.as_tensor(getattr(ds, values_attr))
    if values.dim() != 1 or len(values) != n:
        raise DataError(f"{values_attr} must be 1-D with one entry per item ({n}), got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise DataError(f"{values_attr} must be integers, got dtype {values.dtype}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DataError(f"{count_attr} must be a positive integer, got {count!r}")
    bad = ((values < 0) | (values >= count)).nonzero().flatten()
    if len(bad):
        shown = [f"{describe(ds, i)}: {what} {int(values[i])}" for i in bad[:MAX_LISTED].tolist()]
        raise DataError(f"{type(ds).__name__}: {what}s must lie in [0, {count}) ({count_attr}={count}); "
                        f"out of range in {listing(shown, 'item', len(bad))}")


def check_labels(ds) -> None:
    """The label and group checks of ``validate_dataset``, without touching any file."""
    missing = [a for a in ("num_classes", "num_groups", "labels", "groups") if not hasattr(ds, a)]
    if missing:
        raise DataError(f"{type(ds).__name__} lacks {missing}: fastfair datasets expose num_classes, "
                        "num_groups, labels and groups")
    if len(ds) == 0:
        raise DataError(f"{type(ds).__name__} is empty")
    for values_attr, count_attr, what, _ in _COLUMNS:
        _check_values(ds, values_attr, count_attr, what)
    names = getattr(ds, "group_names", None)
    if names is not None and len(names) != ds.num_groups:
        raise DataError(f"group_names has {len(names)} entries but num_groups={ds.num_groups}")


def validate_dataset(ds, verify_images="auto") -> None:
    """Check once that labels lie in [0, num_classes) and groups in [0, num_groups).

    The error names the offending items (the first 20 and their count). A dataset with its own
    ``validate`` (``CSVImageDataset``) also has its files checked by ``verify_images``
    (``"auto"``, ``"full"``, ``"sample"``, ``"none"``; True/False mean full/none).
    """
    check_labels(ds)
    if hasattr(ds, "validate"):
        ds.validate(verify_images=verify_images)


def _split_problems(splits: dict) -> list[str]:
    """Errors about the splits together: the classes of train, and numberings that disagree."""
    train, problems = splits["train"], []
    present = torch.unique(torch.as_tensor(train.labels))
    if len(present) < 2:
        name = _name(train, "class_names", int(present[0]))
        problems.append(f"the train split has rows of one class only ({name}, all {len(train)} rows): "
                        "training needs at least two; check the label column and the split column")
    for _, count_attr, _, _ in _COLUMNS:
        counts = {s: getattr(splits[s], count_attr) for s in SPLITS}
        if len(set(counts.values())) > 1:
            problems.append(f"the splits disagree on {count_attr}: {counts}")
    return problems


def _name(ds, names_attr: str, value: int) -> str:
    """The value's name as messages show it: integers bare, strings quoted."""
    names = getattr(ds, names_attr, None)
    name = names[value] if names is not None and value < len(names) else str(value)
    return name if name.lstrip("-").isdigit() else repr(name)


def _warn_unseen(splits: dict) -> None:
    """Warn about classes and groups with rows in val/test but none in train (a typo, often).

    Groups only for values a person typed into a CSV: a built-in benchmark leaves groups out of
    training on purpose (a color never seen with a digit is the shift it measures)."""
    train = splits["train"]
    typed = hasattr(train, "csv_path")
    for values_attr, _, what, names_attr in _COLUMNS:
        if what == "group" and not typed:
            continue
        seen = torch.unique(torch.as_tensor(getattr(train, values_attr)))
        count: dict[int, int] = {}
        first: dict[int, str] = {}
        for s in SPLITS[1:]:
            values = torch.as_tensor(getattr(splits[s], values_attr))
            new = ~torch.isin(values, seen)
            for v, n in zip(*(t.tolist() for t in torch.unique(values[new], return_counts=True))):
                count[v] = count.get(v, 0) + n
                first.setdefault(v, describe(splits[s], int((values == v).nonzero()[0])))
        if not count:
            continue
        known = [_name(train, names_attr, int(v)) for v in seen]
        items = []
        for v in list(count)[:MAX_LISTED]:
            name = _name(train, names_attr, v)
            close = difflib.get_close_matches(name, known, n=1) if typed and name.startswith("'") else []
            hint = f", did you mean {close[0]}?" if close else ""
            items.append(f"{name} ({count[v]} row{'s' if count[v] != 1 else ''}, first {first[v]}{hint})")
        warn(f"{what}s with rows in val/test but none in train (a typo in the {what} column? the model never "
             f"trains on them): {listing(items, what, len(count))}")


def _warn_repeats(splits: dict) -> None:
    """Warn about an image listed twice in one split, and about an image in two splits."""
    where: dict[str, dict[str, int]] = {}  # path -> split -> index of its first row there
    repeats, conflicts = [], 0
    for s in SPLITS:
        ds = splits[s]
        if not (hasattr(ds, "paths") and hasattr(ds, "lines")):
            continue
        for i, path in enumerate(ds.paths):
            j = where.setdefault(path, {}).setdefault(s, i)
            if j != i:
                differs = int(ds.labels[i]) != int(ds.labels[j]) or int(ds.groups[i]) != int(ds.groups[j])
                conflicts += differs
                repeats.append(f"line {ds.lines[i]} repeats line {ds.lines[j]} ({path})"
                               + (" with another label or group" if differs else ""))
    if repeats:
        warn(f"duplicated rows: the same image twice in one split ({conflicts} with another label or group), "
             + listing(repeats))
    leaks = [f"{path} in " + " and ".join(f"{s} (line {splits[s].lines[i]})" for s, i in found.items())
             for path, found in where.items() if len(found) > 1]
    if leaks:
        warn("the same image in two splits (evaluation on training images): " + listing(leaks, "image"))


def _image_problems(splits: dict, verify_images, progress: bool) -> list[str]:
    """Every image of the three splits checked once, a file shared by splits included."""
    by_source: dict[str, dict[str, str]] = {}
    others = []
    for s in SPLITS:
        ds = splits[s]
        if hasattr(ds, "image_files"):
            files = by_source.setdefault(ds.csv_path, {})
            for path, where in ds.image_files().items():
                files.setdefault(path, where)
        elif hasattr(ds, "validate"):
            others.append(ds)
    mode = verify_mode(verify_images, sum(len(f) for f in by_source.values()))
    problems = [p for source, files in by_source.items() for p in check_image_files(files, mode, source, progress)]
    for ds in others:
        try:
            ds.validate(verify_images=mode)
        except DataError as e:
            problems.append(str(e))
    return problems


def validate_splits(splits: dict, verify_images="auto", progress: bool = True) -> None:
    """Check ``{"train", "val", "test"}`` as a whole, before any model is built.

    Each split as ``validate_dataset`` does; then the train split has at least two classes and
    the splits share ``num_classes`` and ``num_groups``; every image file is checked once (see
    ``CSVImageDataset.validate``). One ``DataError`` lists every problem found. Warns
    (``DataWarning``) about rows repeated within a split, images in two splits, and classes or
    groups that have rows in val/test but none in train.
    """
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"splits {missing} missing: expected {SPLITS}")
    verify_mode(verify_images, 0)  # a bad option fails before the slow checks
    for s in SPLITS:
        check_labels(splits[s])
    problems = _split_problems(splits)
    _warn_unseen(splits)
    _warn_repeats(splits)
    raise_problems(problems + _image_problems(splits, verify_images, progress))

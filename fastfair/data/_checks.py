"""The error and warning types of bad data, and the checks the dataset classes share."""
from __future__ import annotations

import math
import numbers
import warnings

MAX_LISTED = 20  # offending rows named in one message; the count is always given
# A declared num_classes/num_groups may exceed the rows (a subset of a larger taxonomy) but not
# this: ImageNet-21k has 21,843 classes, and a billion would build a head no machine holds.
MAX_DECLARED = 2**20
MAX_IMAGE_SIZE = 4096  # a 3×4096×4096 float image is 200 MB; beyond that a batch cannot fit


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, line or value to fix."""


class DataWarning(UserWarning):
    """Data that can be trained on but probably is not what was meant (duplicates, leaks)."""


def listing(items: list[str], noun: str = "row", total: int | None = None) -> str:
    """``"3 rows: a, b, c"``, or the first ``MAX_LISTED`` and ``"(first 20 of 57 shown)"``.

    ``total``: the count when ``items`` holds only the first few (describing every offender of
    a million-row file would cost more than the check).
    """
    n = len(items) if total is None else total
    shown = ", ".join(items[:MAX_LISTED])
    more = f" (first {MAX_LISTED} of {n} shown)" if n > MAX_LISTED else ""
    return f"{n} {noun}{'' if n == 1 else 's'}: {shown}{more}"


def warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


def check_image_size(value, minimum: int = 1) -> int:
    """``value`` as an int in ``[minimum, MAX_IMAGE_SIZE]``, else a ``DataError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            minimum <= value <= MAX_IMAGE_SIZE):
        raise DataError(f"image_size must be an integer in [{minimum}, {MAX_IMAGE_SIZE}], got {value!r}")
    return int(value)


def check_mean_std(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Three finite means and three finite positive standard deviations, one per RGB channel."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            vals = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise DataError(f"{name} must be 3 numbers (R, G, B), got {value!r}") from None
        if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
            raise DataError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
        out.append(vals)
    if min(out[1]) <= 0:
        raise DataError(f"std must be > 0 in every channel, got {list(out[1])}")
    return out[0], out[1]

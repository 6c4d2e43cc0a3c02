"""Checking image files before training: every file exists and (by default) decodes in full.

A header that opens is not enough: a truncated JPEG or a PNG with a broken data stream opens
fine and fails only when its pixels are read, some steps into an epoch. So the check decodes
each image as training will (``convert("RGB")``), after PIL's ``verify`` (PNG checksums, which
decoding skips). Every problem is collected, so one run lists all bad files at once.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ._checks import DataError, listing

VERIFY_MODES = ("auto", "full", "sample", "none")
AUTO_FULL_LIMIT = 100_000  # "auto" decodes every image below this many, a sample above
SAMPLE_SIZE = 1_000  # images decoded by "sample" (drawn with a fixed seed)
# True/False were the options before the modes existed
LEGACY_MODES = {True: "full", False: "none"}


def verify_mode(verify_images, num_images: int) -> str:
    """``"full"``, ``"sample"`` or ``"none"`` for an option value and a dataset size."""
    mode = LEGACY_MODES[verify_images] if isinstance(verify_images, bool) else verify_images
    if mode not in VERIFY_MODES:
        raise DataError(f"verify_images must be one of {VERIFY_MODES} (or True/False), got {verify_images!r}")
    if mode == "auto":
        return "full" if num_images < AUTO_FULL_LIMIT else "sample"
    return mode


def decode_error(path: str) -> str | None:
    """Why ``path`` cannot be trained on, or None when it decodes in full."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify leaves the image unusable: open it again
            im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any failure here would be a failure mid-epoch
        return f"{type(e).__name__}: {e}"
    return None


def _decode_all(paths: list[str], progress: bool) -> list[str | None]:
    from tqdm.auto import tqdm

    # PIL releases the GIL while decoding, so threads overlap both the reads and the decoding.
    workers = min(16, os.cpu_count() or 1, max(1, len(paths)))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(decode_error, paths)
        bar = tqdm(results, total=len(paths), desc="verifying images", unit="img", disable=None if progress else True)
        return list(bar)


def check_image_files(files: dict[str, str], mode: str, source: str, progress: bool = True) -> list[str]:
    """Problems with the images ``files`` (path → where it is listed, e.g. ``"line 4"``).

    ``mode`` is a resolved ``verify_mode``. Existence is always checked; ``"full"`` decodes
    every image, ``"sample"`` a seeded sample of ``SAMPLE_SIZE``. Returns one message per kind
    of problem (empty when all is well), each listing the first offenders and their count.
    """
    paths = list(files)
    missing = [p for p in paths if not os.path.isfile(p)]
    problems = []
    if missing:
        problems.append(f"{source}: image files not found, " + listing([f"{files[p]}: {p}" for p in missing], "file"))
    gone = set(missing)
    present = [p for p in paths if p not in gone]
    if mode == "sample" and len(present) > SAMPLE_SIZE:
        present = sorted(random.Random(0).sample(present, SAMPLE_SIZE))
    if mode in ("full", "sample") and present:
        errors = _decode_all(present, progress)
        bad = [f"{files[p]}: {p} ({e})" for p, e in zip(present, errors) if e is not None]
        if bad:
            problems.append(f"{source}: images that cannot be decoded, " + listing(bad, "file"))
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise DataError("\n".join(problems))

"""Checkpoints: ``checkpoints/step_N`` directories of ``accelerator.save_state``, each with a
``manifest.json`` of its files' sizes and hashes.

A checkpoint is written under a temporary name, its manifest last, then renamed, so a directory
named ``step_N`` is complete unless its files were damaged later; the manifest tells which. They
are ordered by step number, never by name, and rotation never removes a protected one (the
selected epoch's).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

MANIFEST = "manifest.json"
_STEP = re.compile(r"^step_(\d+)$")
_RNG = re.compile(r"^random_states_\d+\.pkl$")


def checkpoints(run_dir) -> list[Path]:
    """The run's checkpoints, oldest first by step number."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(ckpt: Path) -> int:
    return int(_STEP.match(ckpt.name).group(1))


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def write_manifest(ckpt: Path) -> None:
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "blake2b": _digest(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files, "check": _check(files)}, indent=1) + "\n")


def _check(files: dict) -> str:
    """A hash of the manifest's own listing, so damage to the manifest is told from damage to a file."""
    return hashlib.blake2b(json.dumps(files, sort_keys=True).encode()).hexdigest()


def problems(ckpt: Path) -> list[tuple[str, str]]:
    """``(file, what is wrong)`` for each damaged, missing or unlisted file of ``ckpt``."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        listed = manifest["files"]
        if manifest["check"] != _check(listed):
            return [(MANIFEST, "corrupt: its listing does not match its own hash")]
    except FileNotFoundError:
        return [(MANIFEST, "missing: the checkpoint is incomplete")]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [(MANIFEST, f"unreadable ({e})")]
    found = []
    for name, want in listed.items():
        p = ckpt / name
        if not p.is_file():
            found.append((name, "missing"))
        elif p.stat().st_size != want["size"]:
            found.append((name, f"truncated or extended: {p.stat().st_size} bytes, {want['size']} written"))
        elif _digest(p) != want["blake2b"]:
            found.append((name, "corrupt: its contents changed since it was written"))
    if not any(_RNG.match(Path(n).name) for n in listed):
        found.append(("random_states_0.pkl", "missing"))
    return found


def save(accelerator, out: Path, step: int, keep: int, protect=()) -> Path:
    """``accelerator.save_state`` to ``checkpoints/step_N``; then the newest ``keep`` and the
    ``protect``-ed steps are kept."""
    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = out / "checkpoints" / f".tmp_step_{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a step_N directory is always a complete checkpoint
        rotate(out, keep, protect)
    accelerator.wait_for_everyone()
    return final


def rotate(out: Path, keep: int, protect=()) -> None:
    ckpts = checkpoints(out)
    for old in ckpts[:-keep]:
        if step_of(old) not in protect:
            shutil.rmtree(old)


class CheckpointError(ValueError):
    pass


def usable(run_dir, allow_missing_rng: bool = False) -> tuple[Path, bool]:
    """The newest checkpoint whose files are intact, and whether its random states load.

    A damaged checkpoint is named with its file and skipped with a warning. Damaged or missing
    random states alone are an error (the run would not reproduce) unless ``allow_missing_rng``.
    """
    ckpts = checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint under {Path(run_dir) / 'checkpoints'}")
    for ckpt in reversed(ckpts):
        bad = problems(ckpt)
        rng_bad = [(f, why) for f, why in bad if _RNG.match(Path(f).name)]
        if bad and len(rng_bad) == len(bad):
            if not allow_missing_rng:
                f, why = rng_bad[0]
                raise CheckpointError(f"{ckpt / f}: random states {why}; resuming without them does not "
                                      "reproduce the run (pass --resume-without-rng-state to go on anyway)")
            warnings.warn(f"{ckpt / rng_bad[0][0]}: random states {rng_bad[0][1]}; resuming without them",
                          stacklevel=2)
            return ckpt, False
        if not bad:
            return ckpt, True
        f, why = bad[0]
        warnings.warn(f"checkpoint file {ckpt / f} is {why}; falling back to the previous checkpoint",
                      stacklevel=2)
    raise CheckpointError(f"--resume {run_dir}: every checkpoint is damaged (see the warnings above)")


def load(accelerator, ckpt: Path, with_rng: bool) -> None:
    """``accelerator.load_state``; without usable random states their file is hidden from it
    (accelerate would otherwise half-load a damaged one)."""
    rng_files = [] if with_rng else [p for p in ckpt.iterdir() if _RNG.match(p.name)]
    hidden = []
    if accelerator.is_main_process:
        for p in rng_files:
            hidden.append((p, p.with_name(p.name + ".damaged")))
            os.replace(*hidden[-1])
    accelerator.wait_for_everyone()
    try:
        accelerator.load_state(str(ckpt))
    finally:
        accelerator.wait_for_everyone()
        for p, moved in hidden:
            os.replace(moved, p)

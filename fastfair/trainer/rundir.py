"""A run directory belongs to one run: new runs refuse a directory holding another, resumes refuse
a config that would change the run, and ``metrics.jsonl`` never holds lines the checkpoint has not
seen."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from ..config import TrainConfig

# What a run writes; --overwrite removes exactly these, and any of them marks a directory as taken.
ARTEFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "predictions_val.npz", "predictions_test.npz",
             "meta.json", "report.json", "report.md", "group_accuracy.png", "adapter", "model", "logs")


def held_artefacts(out: Path) -> list[str]:
    return [name for name in ARTEFACTS if (out / name).exists()]


def check_new_run_dir(cfg: TrainConfig, out: Path) -> list[str]:
    """The artefacts ``--overwrite`` will remove; an error if the directory holds a run and
    overwriting was not asked for. Nothing is removed here (a failed start leaves it as it was)."""
    held = held_artefacts(out)
    if held and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(held)}); continue it with --resume {out}, "
                         "replace it with --overwrite, or choose another --output-dir")
    return held


def clear(out: Path, held: list[str]) -> None:
    for name in held:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a resume whose config differs from the run's in anything but resumable keys."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: {path} not found (not a run directory)")
    saved = yaml.safe_load(path.read_text()) or {}
    theirs = TrainConfig(**{**cfg.to_dict(), **saved}).validate().to_dict()
    ours = cfg.to_dict()
    fixed = [f.name for f in dataclasses.fields(TrainConfig)
             if not f.metadata["resumable"] and f.name != "output_dir"]
    diff = [f"{k}: {theirs[k]!r} in the run, {ours[k]!r} now" for k in fixed if ours.get(k) != theirs.get(k)]
    if diff:
        raise ValueError(f"--resume {run_dir}: these settings would change the run, so they are refused:\n  "
                         + "\n  ".join(diff) + "\nstart a new run (another --output-dir) to change them")


def truncate_metrics(out: Path, epochs_done: int) -> None:
    """Drop ``metrics.jsonl`` lines of epochs the checkpoint has not completed (a kill between a
    validation line and the next checkpoint would otherwise log that epoch twice)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", epochs_done) < epochs_done]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))

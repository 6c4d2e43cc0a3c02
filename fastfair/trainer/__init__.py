"""The trainer: LoRA (or full / linear) fine-tuning of a timm model with a fairness loss, on accelerate.

Three steps: ``prepare(cfg) -> Run`` (accelerator, data, model, loss, optimizer, scheduler, resume;
``run.py``), ``fit(run, hooks)`` (the loop; ``loop.py``) and ``finish(run)`` (evaluation at the
selected epoch, predictions, report, adapter; ``finish.py``); ``train`` is their composition.
One CPU, one GPU, DDP or FSDP come from the accelerate config, with no change here.

A run directory holds ``config.yaml`` (written once the run has started or resumed),
``metrics.jsonl`` (one line per epoch, then the selection), ``checkpoints/step_N`` (complete,
hashed, ordered by step; ``checkpoint.py``), ``predictions_{val,test}.npz``, ``meta.json``, the
fairness report, and the adapter in PEFT format (or ``model/`` for full fine-tuning). It belongs to
one run (``rundir.py``).
"""
from __future__ import annotations

import torch

from .checkpoint import latest_checkpoint
from .data import build_datasets_for, loss_group_table
from .finish import finish
from .guard import NonFiniteTraining
from .loop import Hooks, evaluate, fit, scalars
from .run import Run, prepare
from ..train_cli import side_by_side  # the table lives with the command line; kept here for callers


def train(cfg, resume: str | None = None, stop_after_steps: int | None = None,
          datasets: dict | None = None, backbone: torch.nn.Module | None = None,
          on_epoch_end=None) -> dict:
    """Run one training; returns ``{"output_dir", "val", "test", "selected_epoch", "selection"}``.

    ``resume``: a run directory to continue from its newest intact checkpoint (``cfg`` must be
    its config, but for the resumable keys). ``stop_after_steps``: checkpoint and return
    ``{"output_dir", "stopped_at"}`` after that many optimizer steps, as a preemption would.
    ``datasets`` (``{"train", "val", "test"}``) replaces the config's data; ``backbone`` (a model
    with the task's head) replaces ``create_backbone`` and gets the config's fine-tuning set-up;
    ``on_epoch_end(epoch, val_metrics)`` stops the run when it returns True (optuna pruning), which
    then returns ``{"output_dir", "val", "stopped_at_epoch"}`` without a test evaluation.
    """
    run = prepare(cfg, resume=resume, datasets=datasets, backbone=backbone)
    try:
        outcome = fit(run, Hooks(on_epoch_end=on_epoch_end, stop_after_steps=stop_after_steps))
        if outcome.pop("status") != "done":
            return {"output_dir": str(run.out), **outcome}
        return finish(run)
    finally:
        run.accelerator.end_training()


__all__ = ["Hooks", "NonFiniteTraining", "Run", "build_datasets_for", "evaluate", "finish",
           "fit", "latest_checkpoint", "loss_group_table", "prepare", "scalars", "side_by_side", "train"]

"""``fit``: the training loop, from wherever the run's state says it is to its last step.

The host reads the device only every ``log_every`` steps (the loss, the NaN guard, bad labels),
at the end of each epoch (validation) and before each checkpoint.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..metrics import GroupMetrics, scalar_metrics, summary_keys
from ..models import trainable_parameters
from . import checkpoint
from .run import Run



@dataclass
class Hooks:
    """``on_epoch_end(epoch, val_metrics) -> bool``: called on every process after each
    validation; True stops the run (optuna pruning). ``stop_after_steps``: checkpoint and stop
    after that many optimizer steps in total, as a preemption would."""

    on_epoch_end: Callable[[int, dict], bool] | None = None
    stop_after_steps: int | None = None


@torch.no_grad()
def evaluate(model, loader, accelerator, num_groups: int, num_classes: int) -> GroupMetrics:
    model.eval()
    metrics = GroupMetrics(num_groups, num_classes)
    for images, labels, groups, _ in loader:
        with accelerator.autocast():
            logits = model(images)
        metrics.update(logits.float(), labels, groups, accelerator=accelerator)
    model.train()
    return metrics


def scalars(m: dict) -> dict:
    """What the per-epoch log shows of the metrics: the table's summary keys."""
    return scalar_metrics(m, summary_keys())


class Progress:
    """A tqdm bar named by the run on a terminal; otherwise (a file, a pipe) no bar, and each
    epoch's validation is one plain line."""

    SHOWN = ("accuracy", "worst_group_accuracy", "accuracy_gap")  # the rest is in metrics.jsonl

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        self.name, self.main = run.name, run.accelerator.is_local_main_process
        self.bar = None
        if self.main and sys.stdout.isatty():
            self.bar = tqdm(total=run.total_steps, initial=run.state.step, desc=f"[{self.name}] train",
                            dynamic_ncols=True, file=sys.stdout)

    def step(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def epoch(self, record: dict, loss: float | None) -> None:
        if not self.main:
            return
        vals = " ".join(f"{k}={record['val/' + k]:.4f}" for k in self.SHOWN if f"val/{k}" in record)
        line = (f"[{self.name}] epoch {record['epoch']} step {record['step']}"
                + (f" loss={loss:.4f}" if loss is not None else "") + f" {vals}")
        (self.bar.write if self.bar is not None else print)(line)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Meter:
    """The mean training loss since the last reading, summed on the device."""

    def __init__(self):
        self.total, self.n, self.last = None, 0, None

    def add(self, loss: torch.Tensor) -> None:
        self.total = loss if self.total is None else self.total + loss
        self.n += 1

    def read(self) -> float | None:
        if self.n:
            self.last, self.total, self.n = (self.total / self.n).item(), None, 0
        return self.last


def fit(run: Run, hooks: Hooks | None = None) -> dict:
    """Train until the last step; returns ``{"status": "done" | "stopped" | "preempted", ...}``."""
    hooks, progress, meter, t0 = hooks or Hooks(), Progress(run), Meter(), time.time()
    run.model.train()
    try:
        # a run stopped at its last step resumes with no step left but that epoch's validation
        while (not _done(run) or run.state.batches_in_epoch) and run.state.epoch < run.cfg.epochs:
            outcome = _epoch(run, hooks, progress, meter, t0)
            if outcome is not None:
                return outcome
    finally:
        progress.close()
    save(run)
    return {"status": "done"}


def _done(run: Run) -> bool:
    return run.state.step >= run.total_steps


def _epoch_loader(run: Run):
    state = run.state
    run.train_loader.set_epoch(state.epoch)
    if run.sampler is not None:  # one draw per epoch, so a resumed epoch replays the same batches
        run.sampler.generator.manual_seed(run.cfg.seed * 100_003 + state.epoch)
    if _done(run):
        return []
    if state.batches_in_epoch:
        return run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
    return run.train_loader


def _epoch(run: Run, hooks: Hooks, progress: Progress, meter: Meter, t0: float) -> dict | None:
    state = run.state
    for images, labels, _, index in _epoch_loader(run):
        if not _batch(run, images, labels, index, meter):
            continue  # inside an accumulation window
        state.step += 1
        if state.step % run.cfg.log_every == 0 or state.step == run.total_steps:
            _read(run, meter)
        progress.step(meter.last)
        if run.cfg.save_every and state.step % run.cfg.save_every == 0:
            save(run)
        if hooks.stop_after_steps is not None and state.step >= hooks.stop_after_steps:
            save(run)
            return {"status": "preempted", "stopped_at": state.step}
        if _done(run):
            break
    if not (_done(run) or state.batches_in_epoch >= len(run.train_loader)):
        return None
    val = _end_epoch(run, progress, meter, t0)
    if hooks.on_epoch_end is not None and hooks.on_epoch_end(state.epoch - 1, val):
        save(run)
        return {"status": "stopped", "val": val, "stopped_at_epoch": state.epoch - 1}
    return None


def _batch(run: Run, images, labels, index, meter: Meter) -> bool:
    """One forward/backward; True when it completed an optimizer step."""
    acc, state = run.accelerator, run.state
    with acc.accumulate(run.model):
        with acc.autocast():
            logits = run.model(images)
        out = run.loss_fn(logits, labels, run.loss_table[index])  # fp32 accumulation inside
        loss = out.loss
        if run.tail and state.batches_in_epoch >= len(run.train_loader) - run.tail:
            loss = loss * (run.cfg.grad_accum / run.tail)  # backward divides by grad_accum, not tail
        run.guard.record_loss(out.loss)
        acc.backward(loss)
        update = True
        if acc.sync_gradients:
            params = [p for g in run.optimizer.param_groups for p in g["params"]]
            update = run.guard.allow_update(params, state.step + 1)
        if update:
            run.optimizer.step()
        else:
            state.skipped += 1
        run.optimizer.zero_grad(set_to_none=True)
    state.batches_in_epoch += 1
    meter.add(out.loss.detach())
    if not acc.sync_gradients:
        return False
    if update and not acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped it
        run.scheduler.step()
    return True


def _read(run: Run, meter: Meter) -> None:
    """Where the host reads the device anyway: the loss, bad labels or groups, the NaN guard."""
    run.loss_fn.check()
    run.guard.raise_if_bad(checkpoint.latest_checkpoint(run.out))
    value = meter.read()
    run.accelerator.log({"train/loss": value, "lr": run.scheduler.get_last_lr()[0],
                         "train/skipped_updates": run.state.skipped}, step=run.state.step)


def _end_epoch(run: Run, progress: Progress, meter: Meter, t0: float) -> dict:
    """Validate, log one line, advance the epoch, and checkpoint it if it is the best so far."""
    state, acc = run.state, run.accelerator
    val = evaluate(run.model, run.val_loader, acc, run.num_groups, run.num_classes).compute()
    record = {"epoch": state.epoch, "step": state.step, "time_s": round(time.time() - t0, 2),
              **({"skipped_updates": state.skipped} if state.skipped else {}),
              **{f"val/{k}": v for k, v in scalars(val).items()}}
    acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
    if acc.is_main_process:
        with (run.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    progress.epoch(record, meter.last)
    best = run.selection.update(state, val)
    state.epoch += 1
    state.batches_in_epoch = 0
    if best:
        save(run)
    return val


def save(run: Run):
    """Checkpoint (unless this very state is already saved), after checking that nothing
    non-finite reached the parameters."""
    if run.saved_state == run.state.state_dict():
        return None
    last_good = checkpoint.latest_checkpoint(run.out)
    run.guard.raise_if_bad(last_good, params=trainable_parameters(run.model))
    protect = {run.state.best_step} if run.state.best_step is not None else set()
    path = checkpoint.save(run.accelerator, run.out, run.state.step, run.cfg.keep_checkpoints, protect)
    run.saved_state = run.state.state_dict()
    return path

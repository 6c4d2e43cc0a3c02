"""The NaN guard: non-finite losses and gradients are recorded on the device at every optimizer
step and read only where the host reads anyway (each ``log_every`` steps, before a checkpoint), so
the default policy adds no host sync. ``skip`` must decide before each update, as a grad scaler
does, and so reads the flag every step."""
from __future__ import annotations

import torch

_total_norm = getattr(torch.nn.utils, "get_total_norm", None)


class NonFiniteTraining(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter (``nan_policy='stop'``)."""


class NonFiniteGuard:
    def __init__(self, policy: str, accelerator):
        self.policy, self.accelerator = policy, accelerator
        self.check_grads = accelerator.mixed_precision != "fp16"  # fp16: the grad scaler skips those
        self.window_bad = None  # this accumulation window saw a non-finite loss
        self.first_bad = None  # the first bad optimizer step (-1: none), on the device

    def record_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.window_bad = bad if self.window_bad is None else self.window_bad | bad

    def _window(self, params) -> torch.Tensor:
        bad, self.window_bad = self.window_bad, None
        grads = [p.grad for p in params if p.grad is not None]
        if self.check_grads and grads:
            norm = _total_norm(grads) if _total_norm else torch.stack([g.norm() for g in grads]).norm()
            bad = bad | ~torch.isfinite(norm)
        return bad

    def allow_update(self, params, step: int) -> bool:
        """Called at each optimizer step before the update; False: skip it (policy ``skip``)."""
        bad = self._window(params)
        if self.policy == "skip":
            return not bool(self.accelerator.gather(bad.reshape(1).int()).any())  # gloo has no bool
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        return True

    def raise_if_bad(self, last_good, params=None) -> None:
        """Read the recorded flag (and, before a checkpoint, the parameters); raise naming the
        step and the last good checkpoint if anything was non-finite."""
        gather = self.accelerator.gather
        step = -1 if self.first_bad is None else int(gather(self.first_bad.reshape(1)).max())
        params_bad = False
        if params is not None:
            finite = torch.stack([p.detach().isfinite().all() for p in params]).all().reshape(1).int()
            params_bad = not bool(gather(finite).all())
        if step < 0 and not params_bad:
            return
        where = f"at step {step}" if step >= 0 else "in the parameters"
        raise NonFiniteTraining(
            f"training diverged: non-finite loss or gradient {where}; no checkpoint was written after it. "
            f"Last good checkpoint: {last_good or 'none'}. Lower --lr, or pass --nan-policy skip to skip "
            "such updates")

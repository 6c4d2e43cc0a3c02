"""``FairnessLoss``: mean cross-entropy plus a penalty on the per-group mean losses.

``loss = CE + λ · penalty(L_1..L_G)`` where ``L_g`` is the mean loss of the rows of group ``g``
(a sensitive subgroup, a class, or their intersection: the caller picks the group ids), over
the groups present in the (global) batch. Under torch.distributed the group sums and counts are
all-reduced with autograd (``fastfair.distributed``), so each rank's loss, penalty and, after
DDP's gradient averaging, gradients equal one process's on the global batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from .backend import check_backend
from .distributed import all_reduce_sum
from .ops.grouped_ce import check_flags, grouped_cross_entropy, new_flags

PENALTIES = ("variance", "std", "range", "worst", "dro", "cvar", "none")


class FairnessLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to backpropagate: ce + lam * penalty
    ce: torch.Tensor  # mean cross-entropy over the non-ignored rows
    penalty: torch.Tensor  # the penalty before lam
    group_loss: torch.Tensor  # [G] mean loss per group, NaN where absent; detached, for logging
    group_count: torch.Tensor  # [G] non-ignored rows per group (float)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _masked_variance(L, present, k):
    ks = k.clamp(min=1)
    mean = torch.where(present, L, 0.0).sum() / ks
    return torch.where(present, L - mean, 0.0).pow(2).sum() / ks


class FairnessLoss(nn.Module):
    """``CE + lam · penalty`` over the groups present in the batch.

    Penalties, on the group means ``L_g`` of the ``k`` groups present (absent groups are left
    out; with ``k < 2`` every penalty is 0, with a zero, NaN-free gradient):

    * ``"variance"`` (FairLoRA): the *population* variance ``(1/k) Σ (L_g − L̄)²``. The sample
      variance (``1/(k−1)``) is undefined with one group and jumps as groups come and go;
      DomainBed's V-REx uses the population one too.
    * ``"std"``: its square root (gradient 0 where the variance is exactly 0).
    * ``"range"``: ``max_g L_g − min_g L_g``.
    * ``"worst"`` (GroupDRO): ``Σ q_g L_g / Σ q_g`` over present groups, where the weights are
      updated first, in training mode, by ``q_g ← q_g · exp(step_size · L_g)`` (present groups
      only; ``step_size`` is an inverse temperature) and renormalized. ``q`` is the buffer
      ``dro_q``, so it is checkpointed with the state dict.
    * ``"dro"``: the same weighted loss minus ``ce``, so that with ``lam = 1`` the loss is
      exactly GroupDRO's objective ``Σ q_g L_g`` (Sagawa et al.) and ``lam`` in (0, 1)
      interpolates ``(1 − lam)·CE + lam·Σ q_g L_g``; ``"worst"`` adds it to the full CE instead.
    * ``"cvar"``: the mean of the worst ``alpha`` fraction of present groups, the boundary group
      counted fractionally when ``alpha·k`` is not an integer (exact CVaR of the uniform
      distribution over groups, continuous in ``alpha``).
    * ``"none"``: plain CE (an ERM baseline through the same code).

    ``ce`` is the mean over non-ignored rows (0 when there are none). Inputs as for
    :func:`fastfair.ops.grouped_ce.grouped_cross_entropy`.

    Validation: by default (``validate=False``, the training path) no value check reads the
    device: bad rows (label out of range, group out of range) are left out, recorded in the
    non-persistent buffer ``flags``, and make ``loss`` NaN (the gradient over good rows stays
    finite) on every step until :meth:`check` is called, which raises a ``ValueError`` naming
    the first bad row. Call ``check()`` where the loss is logged. ``validate=True`` checks each
    batch eagerly at the cost of a host synchronization.
    """

    def __init__(
        self,
        num_groups: int,
        lam: float = 1.0,
        penalty: str = "variance",
        alpha: float = 0.5,
        step_size: float = 0.01,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        backend: str = "auto",
        validate: bool = False,
    ):
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if not _finite_number(lam) or not lam >= 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not _finite_number(alpha) or not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not _finite_number(step_size) or not step_size >= 0:
            raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing <= 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.num_groups = num_groups
        self.lam = float(lam)
        self.penalty = penalty
        self.alpha = float(alpha)
        self.step_size = float(step_size)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.backend = check_backend(backend)
        self.validate = validate
        self.register_buffer("flags", new_flags(), persistent=False)
        if penalty in ("worst", "dro"):
            self.register_buffer("dro_q", torch.full((num_groups,), 1.0 / num_groups))

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, lam={self.lam}, penalty={self.penalty!r}"

    def check(self) -> None:
        """Raise ``ValueError`` if a bad row was seen since the last check (one host read)."""
        check_flags(self.flags)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> FairnessLossOutput:
        if self.flags.device != logits.device:
            self.to(logits.device)
        _, gsum, gcount = grouped_cross_entropy(
            logits, labels, groups, self.num_groups, self.ignore_index, self.label_smoothing,
            validate=self.validate, backend=self.backend, flags=self.flags,
        )
        G = self.num_groups
        # One collective per step: sums (differentiable), counts and the bad-row count.
        n_bad = (self.flags[0] + self.flags[2]).to(gsum.dtype).reshape(1)
        stats = all_reduce_sum(torch.cat([gsum, gcount, n_bad]))
        gsum, gcount, n_bad = stats[:G], stats[G:2 * G].detach(), stats[2 * G]

        present = gcount > 0
        k = present.sum()
        ce = gsum.sum() / gcount.sum().clamp(min=1)
        L = gsum / gcount.clamp(min=1)
        pen = self._penalty(L, present, k, ce)
        pen = torch.where(k >= 2, pen, torch.zeros_like(pen))
        # No gradient path through n_bad: only the value turns NaN, loudly, until check().
        loss = ce + self.lam * pen + torch.where(n_bad > 0, float("nan"), 0.0)
        group_loss = torch.where(present, L, float("nan")).detach()
        return FairnessLossOutput(loss, ce, pen, group_loss, gcount)

    def _penalty(self, L, present, k, ce):
        if self.penalty == "none":
            return L.new_zeros(())
        if self.penalty == "variance":
            return _masked_variance(L, present, k)
        if self.penalty == "std":
            var = _masked_variance(L, present, k)
            # 0 (with gradient 0) only for an exact 0; a NaN variance stays NaN, loudly.
            zero = var == 0
            return torch.where(zero, 0.0, torch.where(zero, 1.0, var).sqrt())
        if self.penalty == "range":
            hi = torch.where(present, L, float("-inf")).max()
            lo = torch.where(present, L, float("inf")).min()
            return torch.where(k >= 2, hi - lo, 0.0)
        if self.penalty in ("worst", "dro"):
            q = self._update_dro(L.detach(), present) if self.training else self.dro_q
            w = torch.where(present, q.to(L.dtype), 0.0)
            robust = (w * L).sum() / w.sum().clamp(min=torch.finfo(L.dtype).tiny)
            return robust - ce if self.penalty == "dro" else robust
        # cvar: weights 1 for the floor(alpha·k) worst groups, the fraction left for the next one.
        a = self.alpha * k.to(L.dtype)
        Ls, _ = torch.sort(torch.where(present, L, float("-inf")), descending=True)
        r = torch.arange(L.shape[0], device=L.device, dtype=L.dtype)
        w = (a - r).clamp(0, 1) / a.clamp(min=1e-12)
        return (w * torch.where(r < k, Ls, 0.0)).sum()

    @torch.no_grad()
    def _update_dro(self, L, present):
        q = self.dro_q * torch.exp(self.step_size * torch.where(present, L, 0.0).to(self.dro_q.dtype))
        q = q / q.sum()
        # A NaN or inf group loss would poison the state for good: keep the old weights then.
        ok = torch.isfinite(q).all()
        self.dro_q.copy_(torch.where(ok, q, self.dro_q))
        return self.dro_q.clone()

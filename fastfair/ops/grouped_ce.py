"""Per-group cross-entropy: the plain-PyTorch reference (ground truth and CPU path), the autograd
Function over the fused Triton kernels, and the dispatcher.

``grouped_cross_entropy(logits, labels, groups, G)`` returns ``(per_sample_loss[N],
group_sum[G], group_count[G])``: the row losses (0 for ``ignore_index`` rows), and per group
the sum and number of non-ignored rows. Gradients flow through ``per_sample_loss`` and
``group_sum``, so a penalty built from group means ``group_sum / group_count`` in PyTorch gets the
fused backward: row ``i`` of group ``g`` receives ``(∂ℓ/∂loss_i + ∂ℓ/∂group_sum_g) · ∂loss_i/∂x_i``.

Validation. Wrong dtypes, shapes, lengths and devices are checked on tensor metadata, always,
for free. Checking label and group *values* needs the host to read the device, which on a GPU
is a synchronization:

* ``validate=True`` (default, for direct calls): one host read before any kernel runs; a
  ``ValueError`` names the first offending row and its value.
* ``validate=False`` (the training path): no host read. The kernel never reads through a bad
  row's label; a bad row (label neither ``ignore_index`` nor in [0, C), or group outside [0, G)
  on a non-ignored row) gets a NaN ``per_sample_loss``, joins no group, and is recorded on the
  device in ``flags`` (``new_flags()``; a per-device default buffer when ``flags`` is None).
  ``check_flags(flags)`` raises the same ``ValueError`` later, where the host reads a value
  anyway (e.g. when the loss is logged); the data pipeline validates labels and groups once
  per dataset. A row's group is not checked when its label is ``ignore_index``.

NaN or ±inf logits in a used row give a NaN or inf loss as in ``F.cross_entropy``, never a
finite one (``-inf`` at a non-label class is an ordinary mask and gives a finite loss).
Group sums are accumulated with fp32 atomics: correct to rounding, not bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..backend import nvtx_range, resolve_backend

def kg():
    """The Triton module, imported on first use: the reference path runs without Triton."""
    from ..kernels import grouped_ce

    return grouped_ce


_INT64_MAX = 2**63 - 1
_SHIFT = 2**31
_KEY_BASE = 2**32
_default_flags: dict[torch.device, torch.Tensor] = {}


def new_flags(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh bad-row record: int64[4] = (bad-label rows, first key, bad-group rows, first key)."""
    return torch.tensor([0, _INT64_MAX, 0, _INT64_MAX], dtype=torch.int64, device=device)


def default_flags(device: torch.device | str) -> torch.Tensor:
    """The record that ``validate=False`` calls without ``flags`` write to, one per device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _default_flags:
        _default_flags[device] = new_flags(device)
    return _default_flags[device]


def reset_flags(flags: torch.Tensor) -> None:
    flags.copy_(new_flags(flags.device))


def check_flags(flags: torch.Tensor | None = None, reset: bool = True) -> None:
    """Raise ``ValueError`` if any bad row was recorded; one host read of 4 integers.

    ``flags=None`` checks every per-device default record. Row numbers are positions within
    the batch where the row was seen (the first such row since the last reset).
    """
    records = list(_default_flags.values()) if flags is None else [flags]
    for rec in records:
        n_label, key_label, n_group, key_group = rec.tolist()
        if reset:
            reset_flags(rec)
        msgs = []
        for n, key, what in ((n_label, key_label, "label"), (n_group, key_group, "group")):
            if n:
                row, value = divmod(key, _KEY_BASE)
                msgs.append(f"{n} row(s) with a {what} out of range, the first at row {row} "
                            f"({what} = {value - _SHIFT})")
        if msgs:
            raise ValueError("grouped_cross_entropy masked bad rows: " + "; ".join(msgs)
                             + " (labels must be in [0, C) or ignore_index, groups in [0, G))")


def _check_args(logits, labels, groups, num_groups, ignore_index, label_smoothing):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [N, C] tensor, got "
                         f"{getattr(logits, 'dtype', type(logits))} of shape {getattr(logits, 'shape', None)}")
    n, c = logits.shape
    if c < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    for name, t in (("labels", labels), ("groups", groups)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} rows but logits has {n}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def validate_values(labels, groups, num_classes: int, num_groups: int, ignore_index: int = -100):
    """Eager value check (one host read): ``ValueError`` naming the first bad row and value."""
    used = labels != ignore_index
    bad_label = used & ((labels < 0) | (labels >= num_classes))
    bad_group = used & ((groups < 0) | (groups >= num_groups))
    if not bool((bad_label | bad_group).any()):
        return
    if bool(bad_label.any()):
        i = int(bad_label.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {num_classes}) "
                         f"and is not ignore_index={ignore_index}")
    i = int(bad_group.nonzero()[0, 0])
    raise ValueError(f"groups[{i}] = {int(groups[i])} is outside [0, {num_groups}) "
                     f"(row {i} has label {int(labels[i])})")


@torch.no_grad()
def _record_bad_torch(flags, bad_label, bad_group, labels, groups):
    rows = torch.arange(labels.shape[0], device=labels.device, dtype=torch.int64)
    for off, bad, vals in ((0, bad_label, labels), (2, bad_group, groups)):
        v = vals.to(torch.int64).clamp(-_SHIFT, _SHIFT - 1) + _SHIFT
        key = torch.where(bad, rows * _KEY_BASE + v, _INT64_MAX)
        flags[off] += bad.sum()
        if key.numel():
            flags[off + 1] = torch.minimum(flags[off + 1], key.min())


def grouped_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    flags: torch.Tensor | None = None,
):
    """Plain-PyTorch reference; autograd gives its backward. Computes in fp32 (fp64 for fp64).

    Bad rows are masked, given a NaN loss and recorded in ``flags`` like the kernel does; no
    value check happens here.
    """
    n, c = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    used = labels != ignore_index
    bad_label = used & ((labels < 0) | (labels >= c))
    bad_group = used & ((groups < 0) | (groups >= num_groups))
    valid = used & ~bad_label & ~bad_group
    if flags is not None:
        _record_bad_torch(flags, bad_label, bad_group, labels, groups)
    safe_labels = torch.where(valid, labels.long(), ignore_index)
    loss = F.cross_entropy(logits.to(dtype), safe_labels, reduction="none",
                           ignore_index=ignore_index, label_smoothing=float(label_smoothing))
    loss = torch.where(valid, loss, 0.0)
    safe_groups = torch.where(valid, groups.long(), 0)
    group_sum = torch.zeros(num_groups, dtype=dtype, device=logits.device).index_add(0, safe_groups, loss)
    group_count = torch.zeros(num_groups, dtype=dtype, device=logits.device).index_add(
        0, safe_groups, valid.to(dtype))
    loss = torch.where(bad_label | bad_group, float("nan"), loss)
    return loss, group_sum, group_count


class GroupedCrossEntropyFunction(torch.autograd.Function):
    """Fused forward (per-row loss, group sums and counts) and backward (new dlogits tensor)."""

    @staticmethod
    def forward(ctx, logits, labels, groups, num_groups, ignore_index, label_smoothing, flags):
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        labels, groups = labels.contiguous(), groups.contiguous()  # the kernels index them densely
        with nvtx_range("fastfair.grouped_ce.fwd"):
            loss, lse, group_sum, group_count = kg().grouped_ce_forward(
                logits, labels, groups, num_groups, ignore_index, label_smoothing, flags)
        ctx.save_for_backward(logits, labels, groups, lse)
        ctx.meta = (num_groups, ignore_index, float(label_smoothing))
        ctx.mark_non_differentiable(group_count)
        return loss, group_sum, group_count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_sum, _grad_count):
        logits, labels, groups, lse = ctx.saved_tensors
        num_groups, ignore_index, smoothing = ctx.meta
        with nvtx_range("fastfair.grouped_ce.bwd"):
            dlogits = kg().grouped_ce_backward(
                logits, labels, groups, lse,
                None if grad_loss is None else grad_loss.contiguous(),
                None if grad_sum is None else grad_sum.contiguous(),
                num_groups, ignore_index, smoothing)
        return dlogits, None, None, None, None, None, None


# -- torch.library custom ops: fastfair::grouped_cross_entropy and its backward ---------------------
# The reference is the CPU kernel, the Triton launchers the CUDA one; torch.compile sees opaque ops.
# Functional (autograd can only be registered for ops that mutate nothing): the updated bad-row
# record comes back as a fifth output, copied into the caller's ``flags`` outside the op.
@torch.library.custom_op("fastfair::grouped_cross_entropy", mutates_args=())
def grouped_ce_op(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int,
                  ignore_index: int, label_smoothing: float, flags: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, group_sum, group_count, lse, flags updated with this batch's bad rows)``."""
    flags = flags.clone()
    loss, gsum, gcount = grouped_cross_entropy_reference(
        logits, labels, groups, num_groups, ignore_index, label_smoothing, flags)
    lse = torch.logsumexp(logits.to(loss.dtype), 1)
    return loss, gsum, gcount, lse, flags


@grouped_ce_op.register_fake
def _(logits, labels, groups, num_groups, ignore_index, label_smoothing, flags):
    dt = torch.promote_types(logits.dtype, torch.float32)
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=dt), logits.new_empty(num_groups, dtype=dt),
            logits.new_empty(num_groups, dtype=dt), logits.new_empty(n, dtype=dt), torch.empty_like(flags))


@grouped_ce_op.register_kernel("cuda")
def _(logits, labels, groups, num_groups, ignore_index, label_smoothing, flags):
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    flags = flags.clone()
    loss, lse, gsum, gcount = kg().grouped_ce_forward(
        logits, labels.contiguous(), groups.contiguous(), num_groups, ignore_index, label_smoothing, flags)
    return loss, gsum, gcount, lse, flags


@torch.library.custom_op("fastfair::grouped_cross_entropy_backward", mutates_args=())
def grouped_ce_backward_op(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor,
                           grad_loss: Optional[torch.Tensor], grad_sum: Optional[torch.Tensor],
                           num_groups: int, ignore_index: int, label_smoothing: float) -> torch.Tensor:
    """``dlogits = coef_i · (softmax_i − target_i)`` with ``coef_i = ∂ℓ/∂loss_i + ∂ℓ/∂group_sum_g``."""
    n, c = logits.shape
    used = labels != ignore_index
    valid = used & (labels >= 0) & (labels < c) & (groups >= 0) & (groups < num_groups)
    coef = torch.zeros(n, dtype=lse.dtype, device=logits.device)
    if grad_loss is not None:
        coef = coef + grad_loss.to(lse.dtype)
    if grad_sum is not None:
        coef = coef + grad_sum.to(lse.dtype)[torch.where(valid, groups.long(), 0)]
    prob = torch.exp(logits.to(lse.dtype) - lse[:, None])
    target = F.one_hot(torch.where(valid, labels.long(), 0), c).to(lse.dtype) * (1.0 - label_smoothing)
    target = target + label_smoothing / c
    d = torch.where(valid[:, None], coef[:, None] * (prob - target), 0.0)
    return d.to(logits.dtype)


@grouped_ce_backward_op.register_fake
def _(logits, labels, groups, lse, grad_loss, grad_sum, num_groups, ignore_index, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@grouped_ce_backward_op.register_kernel("cuda")
def _(logits, labels, groups, lse, grad_loss, grad_sum, num_groups, ignore_index, label_smoothing):
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return kg().grouped_ce_backward(
        logits, labels.contiguous(), groups.contiguous(), lse,
        None if grad_loss is None else grad_loss.contiguous(),
        None if grad_sum is None else grad_sum.contiguous(), num_groups, ignore_index, label_smoothing)


def _ce_setup(ctx, inputs, output):
    logits, labels, groups, num_groups, ignore_index, label_smoothing, _ = inputs
    ctx.save_for_backward(logits, labels, groups, output[3])
    ctx.meta = (num_groups, ignore_index, float(label_smoothing))


def _ce_backward(ctx, grad_loss, grad_sum, _grad_count, _grad_lse, _grad_flags):
    logits, labels, groups, lse = ctx.saved_tensors
    d = torch.ops.fastfair.grouped_cross_entropy_backward(logits, labels, groups, lse, grad_loss, grad_sum,
                                                          *ctx.meta)
    return d, None, None, None, None, None, None


grouped_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def grouped_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    validate: bool = True,
    backend: str = "auto",
    flags: torch.Tensor | None = None,
):
    """``(per_sample_loss[N] fp32, group_sum[G] fp32, group_count[G] fp32)`` of a batch.

    ``per_sample_loss`` follows ``F.cross_entropy(reduction="none")`` (label smoothing as in
    PyTorch, 0 on ``ignore_index`` rows); ``group_count`` counts the non-ignored rows of each
    group (float, exact up to 2²⁴ rows). fp64 logits stay fp64 on the reference path.
    ``validate`` and ``flags``: see the module docstring. ``backend``: "auto", "torch", "triton".
    """
    _check_args(logits, labels, groups, num_groups, ignore_index, label_smoothing)
    if validate:
        validate_values(labels, groups, logits.shape[1], num_groups, ignore_index)
    if flags is None:
        flags = default_flags(logits.device)
    elif flags.shape != (4,) or flags.dtype != torch.int64 or flags.device != logits.device:
        raise ValueError(f"flags must be new_flags() on {logits.device}, got {flags.dtype} "
                         f"{tuple(flags.shape)} on {flags.device}")
    use = resolve_backend(backend, logits.device)
    if use == "triton" and logits.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("the Triton grouped_cross_entropy takes fp32/fp16/bf16 logits, got "
                             "float64; use backend='torch'")
        use = "torch"
    if torch.compiler.is_compiling():  # one opaque op (nvtx ranges are for eager only)
        if use == "torch" and logits.is_cuda:
            return grouped_cross_entropy_reference(
                logits, labels, groups, num_groups, ignore_index, label_smoothing, flags)
        loss, gsum, gcount, _, new = torch.ops.fastfair.grouped_cross_entropy(
            logits, labels, groups, num_groups, ignore_index, float(label_smoothing), flags)
        flags.copy_(new)
        return loss, gsum, gcount
    if use == "triton":
        return GroupedCrossEntropyFunction.apply(
            logits, labels, groups, num_groups, ignore_index, float(label_smoothing), flags)
    with nvtx_range("fastfair.grouped_ce.reference"):
        return grouped_cross_entropy_reference(
            logits, labels, groups, num_groups, ignore_index, label_smoothing, flags)

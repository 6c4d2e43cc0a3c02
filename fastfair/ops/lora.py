"""LoRA linear op: the plain-PyTorch reference, the merged-weight design, and the dispatcher.

``y = x Wᵀ + b + Σ_a s_a · (drop_a(x) A_aᵀ) B_aᵀ`` over the active adapters ``a``.
The frozen base weight ``W`` is either a dense tensor or an :class:`Int8Weight` (bitsandbytes'
row-wise int8 storage); in every design the activations stay in their own dtype (weight-only int8).

Design forcing and the table of design names live in ``fastfair.ops.lora_design`` and are
re-exported here: ``DESIGNS``, ``INT8_MODES``, ``force_design(design=None, int8=None)`` (context
manager), the ``FASTFAIR_LORA_DESIGN`` / ``FASTFAIR_LORA_INT8`` environment variables, and
``design_for(...)``: the design this dispatcher would run for a call, for a benchmark's "ships".
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..backend import nvtx_range, resolve_backend, triton_interpreting
from ..int8 import Int8Weight, dense_weight
from .lora_design import (  # noqa: F401  (re-exported: the design-forcing API)
    DESIGNS, ENV_AUTOTUNE, ENV_CACHE_DIR, ENV_DESIGN, ENV_INT8, INT8_MODES, Choice, DesignChooser, Problem,
    force_design,
)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Weight,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropout: Sequence[float],
    training: bool = True,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Reference LoRA forward in plain PyTorch; autograd gives its backward.

    ``masks[a]``, when given, is the keep-mask of adapter ``a`` (bool, shape of ``x``) used in
    place of torch's dropout RNG, so a kernel that draws its mask from a seed can be compared
    with this function mask for mask.
    """
    w = dense_weight(weight, x.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    for i, (A, B, s, p) in enumerate(zip(lora_A, lora_B, scales, dropout)):
        mask = None if masks is None else masks[i]
        if mask is not None:
            xd = x * mask.to(x.dtype) / (1.0 - p) if p > 0 else x
        else:
            xd = F.dropout(x, p, training) if p > 0 else x
        y = y + s * F.linear(F.linear(xd, A.to(x.dtype)), B.to(x.dtype))
    return y


# -- the merged-weight design ------------------------------------------------------------------
def merged_weight(weight, A_cat, B_s, dtype) -> torch.Tensor:
    """``W' = W + B_s A_cat`` (``B_s`` carries the scales) in a new ``dtype`` buffer.

    An int8 base is dequantized straight into that buffer: one N×K tensor per call from the
    allocator, no cache that outlives the call (a global one aliases under torch.compile).
    """
    w = weight.dequantize(dtype) if isinstance(weight, Int8Weight) else weight.to(dtype, copy=True)
    if A_cat is None:
        return w
    return w.addmm_(B_s, A_cat)


class MergedLoRAFunction(torch.autograd.Function):
    """No dropout: ``y = x W'ᵀ + b`` and ``dX = dY W'``, one dense GEMM each.

    ``W'`` is formed again in backward rather than saved (N×K per layer would double the frozen
    weights' memory; forming it is 2·N·K·R FLOPs). ``dA``, ``dB`` are thin GEMMs on
    ``xa = x Aᵀ`` (saved) and ``g = dY B_s``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, *ab):
        n = len(ab) // 2
        dt, K = x.dtype, x.shape[-1]
        x2 = x.reshape(-1, K)
        A_cat = torch.cat([A.to(dt) for A in ab[:n]]) if n else None
        B_s = torch.cat([B.to(dt) * s for B, s in zip(ab[n:], scales)], 1) if n else None
        y = F.linear(x2, merged_weight(weight, A_cat, B_s, dt), None if bias is None else bias.to(dt))
        xa = x2 @ A_cat.t() if n and any(ctx.needs_input_grad[4 + n:]) else None
        ctx.weight, ctx.scales, ctx.x_shape = weight, scales, x.shape
        ctx.ranks = [A.shape[0] for A in ab[:n]]
        ctx.dtypes = [t.dtype for t in ab] + [None if bias is None else bias.dtype]
        ctx.save_for_backward(x2, A_cat, B_s, xa)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, A_cat, B_s, xa = ctx.saved_tensors
        need, n = ctx.needs_input_grad, len(ctx.ranks)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx = dbias = None
        if need[0]:
            dx = (dy2 @ merged_weight(ctx.weight, A_cat, B_s, x2.dtype)).view(ctx.x_shape)
        if need[2]:
            dbias = dy2.sum(0).to(ctx.dtypes[-1])
        g = dy2 @ B_s if any(need[4:4 + n]) else None
        grads, start = [None] * (2 * n), 0
        for a, r in enumerate(ctx.ranks):
            sl = slice(start, start + r)
            start += r
            if need[4 + a]:
                grads[a] = (g[:, sl].t() @ x2).to(ctx.dtypes[a])
            if need[4 + n + a]:
                grads[n + a] = (ctx.scales[a] * (dy2.t() @ xa[:, sl])).to(ctx.dtypes[n + a])
        return (dx, None, dbias, None, *grads)


def lora_linear_merged(x, weight, bias, lora_A, lora_B, scales) -> torch.Tensor:
    """The merged design on any device (plain PyTorch: cuBLAS on CUDA, MKL/oneDNN on the CPU)."""
    return MergedLoRAFunction.apply(x, weight, bias, tuple(float(s) for s in scales), *lora_A, *lora_B)


# -- the dispatcher ----------------------------------------------------------------------------
def _time_on_cuda(p: Problem, design: str, int8_mode: str | None, reps: int = 5) -> float:
    """Seconds per fwd+bwd of ``design`` on random inputs of ``p``'s shape (CUDA events)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    t = lambda *s, dt=p.dtype: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    weight = (Int8Weight(torch.randint(-127, 128, (p.N, p.K), dtype=torch.int8, device=dev),
                         torch.rand(p.N, device=dev) + 0.01) if p.int8 else t(p.N, p.K) / math.sqrt(p.K))
    ranks = [p.rank // p.n_adapters + (a < p.rank % p.n_adapters) for a in range(p.n_adapters)]
    As = [t(r, p.K, dt=torch.float32).requires_grad_() for r in ranks]
    Bs = [(t(p.N, r, dt=torch.float32) * 0.01).requires_grad_() for r in ranks]
    x, dy = t(p.M, p.K).requires_grad_(), t(p.M, p.N)
    drop = [0.1 if p.dropout else 0.0] * p.n_adapters

    def step():
        y = lora_linear(x, weight, None, As, Bs, [1.0] * p.n_adapters, drop, True, "auto")
        y.backward(dy)

    with torch.enable_grad(), torch.autocast("cuda", enabled=False), force_design(design, int8_mode):
        step(), step()  # Triton compiles and autotunes on the first calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            step()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / reps / 1e3


_CHOOSER = DesignChooser(timer=_time_on_cuda)


def design_for(M: int, K: int, N: int, rank: int, *, dtype: torch.dtype = torch.bfloat16,
               dropout: bool = False, int8: bool = False, device: str | torch.device = "cuda",
               n_adapters: int = 1, backend: str = "auto") -> Choice:
    """The ``Choice(design, int8, source)`` the dispatcher makes for such a call.

    ``M``: rows of x (batch × tokens); ``rank``: total rank of the active adapters; ``dropout``:
    training with some p > 0. On a GPU the first ask of a key times the candidates (and caches).
    """
    dev = torch.device(device).type
    p = Problem(M, K, N, rank, dtype, bool(dropout), bool(int8), dev, n_adapters,
                interpreting=triton_interpreting())
    return _CHOOSER.choose(p, backend)


def _problem(x, weight, lora_A, dropout, training) -> Problem:
    R = sum(A.shape[0] for A in lora_A)
    return Problem(x.numel() // max(x.shape[-1], 1), x.shape[-1], weight.shape[0], R, x.dtype,
                   bool(training) and any(p > 0 for p in dropout), isinstance(weight, Int8Weight),
                   x.device.type, len(lora_A), interpreting=triton_interpreting())


def _run_reference(x, weight, bias, lora_A, lora_B, scales, dropout, training, int8_mode):
    with nvtx_range("fastfair.lora_linear.reference"):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scales, dropout, training)


def _run_merged(x, weight, bias, lora_A, lora_B, scales, dropout, training, int8_mode):
    with nvtx_range("fastfair.lora_linear.merged"):
        return lora_linear_merged(x, weight, bias, lora_A, lora_B, scales)


def _run_triton(design):
    def run(x, weight, bias, lora_A, lora_B, scales, dropout, training, int8_mode):
        from .lora_triton import lora_linear_triton  # imports Triton: only when a Triton design runs

        return lora_linear_triton(x, weight, bias, lora_A, lora_B, scales, dropout, training,
                                  design=design, int8=int8_mode or "dequant")
    return run


_RUN = {"reference": _run_reference, "merged": _run_merged,
        **{d: _run_triton(d) for d in ("cublas", "fused", "fused_inloop")}}


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Weight,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropout: Sequence[float],
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Run the design ``design_for`` picks (or the forced one) for this call.

    ``backend``: ``"torch"`` (reference or merged), ``"triton"`` (the Triton designs; CPU tensors
    only under ``TRITON_INTERPRET=1``) or ``"auto"``.
    """
    use = resolve_backend(backend, x.device)
    trains_base = isinstance(weight, torch.Tensor) and weight.requires_grad
    if trains_base or x.numel() == 0 or weight.shape[0] == 0:
        design, mode = "reference", None  # nothing for a kernel to do, or a weight to train
    else:
        choice = _CHOOSER.choose(_problem(x, weight, lora_A, dropout, training),
                                 "auto" if backend == "auto" else use)
        design, mode = choice.design, choice.int8
    dev = x.device.type
    if design != "reference" and torch.is_autocast_enabled(dev) and x.is_floating_point() \
            and x.dtype != torch.float64:
        # torch does not autocast a custom Function: cast x as it would for F.linear, or a
        # bf16 mixed-precision run does its LoRA layers' GEMMs in float32
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            return _RUN[design](x, weight, bias, lora_A, lora_B, scales, dropout, training, mode)
    return _RUN[design](x, weight, bias, lora_A, lora_B, scales, dropout, training, mode)

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

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..backend import nvtx_range, resolve_backend, triton_interpreting
from ..int8 import Int8Weight, dense_weight
from ..kernels.lora_tiles import G_DB_MAX_RANK
from .lora_design import (  # noqa: F401  (re-exported: the design-forcing API)
    DESIGNS, ENV_AUTOTUNE, ENV_CACHE_DIR, ENV_DESIGN, ENV_INT8, INT8_MODES, TRITON_DESIGNS, Choice,
    DesignChooser, Problem, force_design,
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


# -- dropout masks: drawn once per forward, kept at 1 bit per element for backward ---------------
def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool [..., K] -> uint8 [..., ceil(K/8)], bit j of byte i = element 8·i + j."""
    pad = (-keep.shape[-1]) % 8
    k = F.pad(keep.to(torch.uint8), (0, pad)).unflatten(-1, (-1, 8))
    return (k << torch.arange(8, dtype=torch.uint8, device=keep.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [..., ceil(K/8)] -> bool [..., K]."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.flatten(-2)[..., :K].bool()


def draw_masks(seed: torch.Tensor, M: int, K: int, ps: Sequence[float]) -> torch.Tensor:
    """Packed keep-masks uint8 [n_adapters, M, ceil(K/8)], ``rand >= p_a``, from one generator
    seeded by ``seed`` (int64 [1]): adapters draw successive, independent streams; each call a
    fresh seed. Reading the seed is a host read: free on the CPU, a sync on a GPU (where only a
    forced ``reference`` with dropout comes here; the Triton designs draw in-kernel)."""
    dev = seed.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed.reshape(-1)[0]))
    out = torch.empty((len(ps), M, (K + 7) // 8), dtype=torch.uint8, device=dev)
    for a, p in enumerate(ps):
        out[a] = pack_bits(torch.rand((M, K), generator=gen, device=dev) >= p)
    return out


# -- the plain-PyTorch kernels: reference (any dropout) and merged (none) ------------------------
def merged_weight(weight, A_cat, B_s, dtype) -> torch.Tensor:
    """``W' = W + B_s A_cat`` (``B_s`` carries the scales) in a new ``dtype`` buffer.

    An int8 base is dequantized straight into that buffer: one N×K tensor per call from the
    allocator, no cache that outlives the call (a global one aliases under torch.compile).
    """
    w = weight.dequantize(dtype) if isinstance(weight, Int8Weight) else weight.to(dtype, copy=True)
    if A_cat is None or A_cat.shape[0] == 0:
        return w
    return w.addmm_(B_s, A_cat)


def _coefs(scales, ps):
    return [float(s) / (1.0 - p) if p > 0 else float(s) for s, p in zip(scales, ps)]


def _base(weight, weight_scale):
    return weight if weight_scale is None else Int8Weight(weight, weight_scale)


def _stacked(lora_A, lora_B, coefs, dt, K, N, device):
    if not lora_A:
        return torch.empty((0, K), dtype=dt, device=device), torch.empty((N, 0), dtype=dt, device=device)
    if len(lora_A) == 1:  # no cat: a copy per call and layer for nothing
        return lora_A[0].to(dt), lora_B[0].to(dt) * coefs[0]
    return (torch.cat([A.to(dt) for A in lora_A]),
            torch.cat([B.to(dt) * c for B, c in zip(lora_B, coefs)], 1))


def torch_forward(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed, merged, need_xa=True,
                  keep_merged=None):
    """``(y, xa_s, masks)``: ``xa_s[:, a] = c_a (keep_a ⊙ x) A_aᵀ`` (saved for dB; [M, 0] when
    ``need_xa`` is off and merged, sparing a pass over x), ``masks`` packed (``[0, M, ·]``
    without dropout). ``dropout`` is already 0 for eval calls. ``keep_merged``: a list that
    receives the merged weight ``W'`` (merged only) so backward need not form it again."""
    K, dt = x.shape[-1], x.dtype
    x2 = x.reshape(-1, K)
    M, base = x2.shape[0], _base(weight, weight_scale)
    N = base.shape[0]
    coefs = _coefs(scales, dropout)
    A_cat, B_s = _stacked(lora_A, lora_B, coefs, dt, K, N, x.device)
    b = None if bias is None else bias.to(dt)
    drop = seed is not None and any(p > 0 for p in dropout)
    masks = (draw_masks(seed, M, K, dropout) if drop
             else torch.empty((0, M, (K + 7) // 8), dtype=torch.uint8, device=x.device))
    if merged:
        w_merged = merged_weight(base, A_cat, B_s, dt)
        if keep_merged is not None:
            keep_merged.append(w_merged)
        y = F.linear(x2, w_merged, b)
        xa = (x2 @ A_cat.t()) * _rank_cols(coefs, lora_A, dt, x.device) if need_xa else x2.new_empty((M, 0))
    else:
        y = F.linear(x2, dense_weight(base, dt), b)
        cols, start = [], 0
        for a, A in enumerate(lora_A):
            r = A.shape[0]
            xd = x2 * unpack_bits(masks[a], K) if drop and dropout[a] > 0 else x2
            cols.append((xd @ A_cat[start:start + r].t()) * coefs[a])
            y = y + cols[-1] @ lora_B[a].to(dt).t()
            start += r
        xa = torch.cat(cols, 1) if cols else x2.new_empty((M, 0))
    return y.view(*x.shape[:-1], N), xa, masks


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32 sums, fp64 stays fp64


def _rank_cols(coefs, lora_A, dt, device):
    return torch.tensor([c for c, A in zip(coefs, lora_A) for _ in range(A.shape[0])], dtype=dt, device=device)


def _fused_g_db(dy2: torch.Tensor, R: int) -> bool:
    """Whether ``g`` and ``dB`` come from one Triton pass over dY: on CUDA, rank <= 64, and not
    under deterministic algorithms (its dB adds by atomics). float64 stays on cuBLAS."""
    return (dy2.is_cuda and dy2.dtype != torch.float64 and 0 < R <= G_DB_MAX_RANK
            and not torch.are_deterministic_algorithms_enabled())


def torch_backward(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, scales, dropout, merged, needs,
                   w_merged=None):
    """``(dx, dbias (fp32 or fp64), dA, dB)`` of ``torch_forward``; unneeded ones are empty [0] tensors.
    ``w_merged``: the forward's ``W'`` (merged), else it is formed again.

    ``g_s = dY B_s`` (scales folded into B); ``dA_a = g_aᵀ (keep_a ⊙ x)``, ``dB_a = dYᵀ xa_a``;
    ``dX = dY W'`` when merged, else ``dY W + Σ_a keep_a ⊙ (g_a A_a)``.
    """
    K, dt = x.shape[-1], x.dtype
    x2, n = x.reshape(-1, K), len(lora_A)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)
    base, coefs = _base(weight, weight_scale), _coefs(scales, dropout)
    A_cat, B_s = _stacked(lora_A, lora_B, coefs, dt, K, dy2.shape[1], x.device)
    drop = masks.shape[0] > 0
    keep = [unpack_bits(masks[a], K) if drop and dropout[a] > 0 else None for a in range(n)]
    db32 = None
    if any(needs[2 + n:]) and _fused_g_db(dy2, B_s.shape[1]):
        # one Triton pass reads dY for both g and dB (two cuBLAS GEMMs would read it twice)
        from ..kernels import lora as kl

        g = torch.empty((dy2.shape[0], B_s.shape[1]), dtype=dt, device=x.device)
        db32 = torch.zeros((dy2.shape[1], B_s.shape[1]), dtype=torch.float32, device=x.device)
        kl.lora_g_db(dy2, B_s, xa, g, db32)
    else:
        g = dy2 @ B_s
    empty = lambda: x.new_empty(0)  # noqa: E731  (a new one each: returns of an op may not alias)
    starts = [0]
    for A in lora_A:
        starts.append(starts[-1] + A.shape[0])
    dx = empty()
    if needs[0]:
        if merged:
            dx = dy2 @ (merged_weight(base, A_cat, B_s, dt) if w_merged is None else w_merged)
        else:
            dx = dy2 @ dense_weight(base, dt)
            for a in range(n):
                ga = g[:, starts[a]:starts[a + 1]] @ A_cat[starts[a]:starts[a + 1]]
                dx = dx + (ga if keep[a] is None else ga * keep[a])
        dx = dx.view(x.shape)
    dbias = dy2.sum(0, dtype=_acc_dtype(dt)) if needs[1] else empty()
    dA, dB = [], []
    for a in range(n):
        sl = slice(starts[a], starts[a + 1])
        xd = x2 if keep[a] is None else x2 * keep[a]
        dA.append((g[:, sl].t() @ xd).to(lora_A[a].dtype) if needs[2 + a] else empty())
        if not needs[2 + n + a]:
            dB.append(empty())
        else:
            dB.append((dy2.t() @ xa[:, sl] if db32 is None else db32[:, sl]).to(lora_B[a].dtype))
    return dx, dbias, dA, dB


# -- torch.library custom ops: fastfair::lora_linear and its backward -----------------------------
# The plain-PyTorch kernels above are the default (CPU) implementation; CUDA runs the Triton
# designs through fastfair.ops.lora_triton. torch.compile sees two opaque ops with fake
# (shape-only) implementations: no graph break, and the same ops under CUDA graphs.
@torch.library.custom_op("fastfair::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], lora_A: List[torch.Tensor], lora_B: List[torch.Tensor],
                   scales: List[float], dropout: List[float], seed: Optional[torch.Tensor], design: str,
                   int8_mode: str, need_xa: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, xa_s, packed masks)``; ``dropout`` holds 0 for eval calls, ``seed`` int64 [1] or None;
    ``need_xa``: some lora_B will want its gradient (else merged skips ``xa_s``)."""
    return torch_forward(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed,
                         merged=design == "merged", need_xa=need_xa)


@lora_linear_op.register_fake
def _(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed, design, int8_mode, need_xa):
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // K
    R = sum(A.shape[0] for A in lora_A) if need_xa or design != "merged" else 0
    nd = len(lora_A) if seed is not None and any(p > 0 for p in dropout) else 0
    masks = x.new_empty((nd, M, (K + 7) // 8), dtype=torch.uint8)
    return x.new_empty((*x.shape[:-1], N)), x.new_empty((M, R)), masks


@torch.library.custom_op("fastfair::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
        dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_scale: Optional[torch.Tensor],
        lora_A: List[torch.Tensor], lora_B: List[torch.Tensor], xa: torch.Tensor, masks: torch.Tensor,
        seed: Optional[torch.Tensor], scales: List[float], dropout: List[float], design: str, int8_mode: str,
        needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """``(dx, dbias fp32, dA, dB)``; ``needs`` = [x, bias, *A, *B]; unneeded grads are empty [0]."""
    return torch_backward(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, scales, dropout,
                          design == "merged", needs)


@lora_linear_backward_op.register_fake
def _(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, seed, scales, dropout, design, int8_mode, needs):
    n = len(lora_A)
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if needs[0] else e,
            dy.new_empty((dy.shape[-1],), dtype=_acc_dtype(x.dtype)) if needs[1] else e,
            [A.new_empty(A.shape) if needs[2 + a] else e for a, A in enumerate(lora_A)],
            [B.new_empty(B.shape) if needs[2 + n + a] else e for a, B in enumerate(lora_B)])


def _setup_context(ctx, inputs, output):
    x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed, design, mode, _ = inputs
    _, xa, masks = output
    n = len(lora_A)
    ctx.save_for_backward(x, weight, weight_scale, xa, masks, seed, *lora_A, *lora_B)
    ctx.meta = (n, scales, dropout, design, mode, None if bias is None else bias.dtype)
    ctx.needs = [x.requires_grad, bias is not None and bias.requires_grad,
                 *[t.requires_grad for t in lora_A], *[t.requires_grad for t in lora_B]]


def _backward(ctx, dy, _dxa, _dmasks):
    x, weight, weight_scale, xa, masks, seed, *ab = ctx.saved_tensors
    n, scales, dropout, design, mode, bias_dtype = ctx.meta
    dx, dbias, dA, dB = torch.ops.fastfair.lora_linear_backward(
        dy, x, weight, weight_scale, ab[:n], ab[n:], xa, masks, seed, scales, dropout, design, mode, ctx.needs)
    need = ctx.needs
    pick = lambda t, k: t if need[k] else None  # noqa: E731
    return (pick(dx, 0), None, None, dbias.to(bias_dtype) if need[1] else None,
            [pick(t, 2 + a) for a, t in enumerate(dA)], [pick(t, 2 + n + a) for a, t in enumerate(dB)],
            *([] if n == 0 else None,) * 2, None, None, None, None)  # float lists: a leaf, an empty one a list


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


@lora_linear_op.register_kernel("cuda")
def _(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed, design, int8_mode, need_xa):
    if design not in TRITON_DESIGNS:
        return torch_forward(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed,
                             merged=design == "merged", need_xa=need_xa)
    from . import lora_triton

    return lora_triton.op_forward(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed,
                                  design, int8_mode)


@lora_linear_backward_op.register_kernel("cuda")
def _(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, seed, scales, dropout, design, int8_mode, needs):
    if design not in TRITON_DESIGNS:
        return torch_backward(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, scales, dropout,
                              design == "merged", needs)
    from . import lora_triton

    return lora_triton.op_backward(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, seed, scales,
                                   dropout, design, int8_mode, needs)


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


# Without a GPU there is nothing to time: design_for(device="cuda") then answers from the prior.
_CHOOSER = DesignChooser(timer=_time_on_cuda if torch.cuda.is_available() else None)


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


def _problem(x, weight, lora_A, dropout, training) -> tuple:
    """``Problem``'s fields for this call, as plain values."""
    R = sum(A.shape[0] for A in lora_A)
    return (x.numel() // max(x.shape[-1], 1), x.shape[-1], weight.shape[0], R, x.dtype,
            bool(training) and any(p > 0 for p in dropout), isinstance(weight, Int8Weight),
            x.device.type, len(lora_A), triton_interpreting())


class _EagerTorchLoRA(torch.autograd.Function):
    """Eager calls of the plain-PyTorch designs: the custom op's own forward and backward without
    its dispatch (pytree flattening, schema defaults: about 0.3 ms of Python per layer and step,
    measured on the CPU, 3x what peft's layer costs). A dense merged call also keeps its ``W'`` for
    backward (one weight-sized tensor per layer) instead of forming it twice per step; an int8 base
    forms it again so the step never holds a 16-bit copy of every weight. torch.compile traces the
    custom op instead."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, scales, dropout, seed, merged, need_xa, *ab):
        n = len(ab) // 2
        keep = [] if merged and weight_scale is None else None
        y, xa, masks = torch_forward(x, weight, weight_scale, bias, ab[:n], ab[n:], scales, dropout, seed,
                                     merged, need_xa, keep_merged=keep)
        ctx.save_for_backward(x, weight, weight_scale, xa, masks, keep[0] if keep else None, *ab)
        ctx.meta = (n, scales, dropout, merged, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, weight_scale, xa, masks, w_merged, *ab = ctx.saved_tensors
        n, scales, dropout, merged, bias_dtype = ctx.meta
        need = ctx.needs_input_grad
        needs = [need[0], need[3], *need[9:]]
        dx, dbias, dA, dB = torch_backward(dy, x, weight, weight_scale, ab[:n], ab[n:], xa, masks, scales,
                                           dropout, merged, needs, w_merged=w_merged)
        grads = [t if needs[2 + i] else None for i, t in enumerate([*dA, *dB])]
        return (dx if need[0] else None, None, None, dbias.to(bias_dtype) if need[3] else None,
                None, None, None, None, None, *grads)


def _run_op(x, weight, bias, lora_A, lora_B, scales, dropout, training, design, int8_mode):
    ps = [float(p) if training else 0.0 for p in dropout]
    seed = draw_seed(x.device) if any(ps) else None
    w, ws = (weight.CB, weight.SCB) if isinstance(weight, Int8Weight) else (weight, None)
    need_xa = torch.is_grad_enabled() and any(B.requires_grad for B in lora_B)
    scales = [float(s) for s in scales]
    if not torch.compiler.is_compiling() and design not in TRITON_DESIGNS:
        with _nvtx(f"fastfair.lora_linear.{design}"):
            return _EagerTorchLoRA.apply(x, w, ws, bias, scales, ps, seed, design == "merged", need_xa,
                                         *lora_A, *lora_B)
    with _nvtx(f"fastfair.lora_linear.{design}"):
        return torch.ops.fastfair.lora_linear(x, w, ws, bias, list(lora_A), list(lora_B), scales, ps, seed,
                                              design, int8_mode or "dequant", need_xa)[0]


def draw_seed(device) -> torch.Tensor:
    """One call's dropout seed (int64 [1]) from ``device``'s generator: no host read here, and
    under torch.compile a traced random op rather than a graph break."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _nvtx(name):
    # nvtx ranges are Python side effects: outside compilation only.
    return contextlib.nullcontext() if torch.compiler.is_compiling() else nvtx_range(name)


def _run_triton(x, weight, bias, lora_A, lora_B, scales, dropout, training, design, int8_mode):
    if torch.compiler.is_compiling():
        return _run_op(x, weight, bias, lora_A, lora_B, scales, dropout, training, design, int8_mode)
    from .lora_triton import lora_linear_triton  # eager: the autograd Function, fewest layers

    return lora_linear_triton(x, weight, bias, lora_A, lora_B, scales, dropout, training,
                              design=design, int8=int8_mode or "dequant")


def _run_reference(x, weight, bias, lora_A, lora_B, scales, dropout, training):
    with _nvtx("fastfair.lora_linear.reference"):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scales, dropout, training)


_RUN = {"reference": _run_op, "merged": _run_op, **{d: _run_triton for d in TRITON_DESIGNS}}


@torch.compiler.assume_constant_result
def _choose(M, K, N, R, dtype, dropout, int8, device, n_adapters, interpreting, backend) -> Choice:
    # Plain arguments: under torch.compile this runs once while tracing, baked into the graph.
    return _CHOOSER.choose(Problem(M, K, N, R, dtype, dropout, int8, device, n_adapters, interpreting), backend)


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
    if isinstance(weight, torch.Tensor) and weight.requires_grad or x.numel() == 0 or weight.shape[0] == 0:
        # a base weight to train (only autograd through the reference does), or nothing to compute
        return _run_reference(x, weight, bias, lora_A, lora_B, scales, dropout, training)
    choice = _choose(*_problem(x, weight, lora_A, dropout, training), "auto" if backend == "auto" else use)
    design, mode = choice.design, choice.int8
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        # torch does not autocast a custom op or Function: cast x as it would for F.linear, or a
        # bf16 mixed-precision run does its LoRA layers' GEMMs in float32
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            return _RUN[design](x, weight, bias, lora_A, lora_B, scales, dropout, training, design, mode)
    return _RUN[design](x, weight, bias, lora_A, lora_B, scales, dropout, training, design, mode)

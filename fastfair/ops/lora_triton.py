"""Fused Triton LoRA linear: the autograd function around ``fastfair.kernels.lora``.

Forward ``y = x Wᵀ + b + Σ_a c_a (keep_a ⊙ x) A_aᵀ B_aᵀ`` with ``c_a = s_a / (1 - p_a)``; the
derivation of the backward and the choice between the two designs are in docs/kernels/lora.md:

* ``"fused"`` (design a): one Triton GEMM adds the low-rank term to the accumulator and the bias
  in the epilogue, so the M×N output is written once. Its down-projection (``x Aᵀ`` forward,
  ``dY B`` for ``dX``, with ``dB`` riding along) can be accumulated from the tiles the loop already
  holds, trading a pass over x or dY for recomputing it per output column block.
* ``"cublas"`` (design b): cuBLAS for the base product, then ``y += xa_s Bᵀ`` in place.

Both draw each adapter's dropout mask once per forward, from one seed per call, into 1 bit per
element (``M·K/8`` bytes), and unpack it in the down-projection, dX and dA; ``drop(x)`` is never
stored.
An int8 base is either dequantized into one reused 16-bit buffer (``"dequant"``) or read as int8
by the fused GEMM (``"inloop"``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..backend import nvtx_range, resolve_backend
from ..int8 import Int8Weight
from ..kernels import _utils
from ..kernels import lora as kl
from ..kernels import lora_tiles as tiles
from .lora_design import INT8_MODES, TRITON_DESIGNS

MAX_RANK = tiles.MAX_RANK
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh Philox seed on ``device`` from its generator: the kernels load it, so it never
    travels to the host (no ``.item()``, no sync, nothing for torch.compile to break on)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def loop_plan(design: str, R: int, dropout: bool) -> tuple[bool, bool]:
    """(forward down-projection in the loop, dX's ``g``/``dB`` in the loop) for ``design``.

    Only ``fused_inloop`` loops. Its forward does not with dropout: each adapter would need its own
    masked copy of every x tile inside the loop (one more product per adapter and k-step, repeated
    per output column block), so the down-projection stays a separate pass there.
    """
    can = design == "fused_inloop" and 0 < R <= tiles.DOWN_MAX_RANK
    return can and not dropout, can


def _dense(w, scb, dtype):
    """The base weight in ``dtype``; int8 is dequantized into a buffer of this call only (a global
    cache shared between layers aliases inputs under torch.compile)."""
    if scb is None:
        return w.to(dtype)
    with nvtx_range("fastfair.lora.dequant_int8"):
        return torch.mul(w, (scb.float() / 127.0).unsqueeze(1), out=_utils.alloc(w.shape, dtype, w.device))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: no stream synchronization
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=64)
def _group_offsets(device: torch.device, offs: tuple) -> torch.Tensor:
    """A device copy of the adapters' rank offsets, made once per stack."""
    return _to_device(torch.tensor(offs, dtype=torch.int32), device)


@functools.lru_cache(maxsize=64)
def _rank_coefs(device: torch.device, starts: tuple, coefs: tuple) -> torch.Tensor:
    """``c_a`` repeated over adapter a's rank columns (fp32 [R]), made once per stack."""
    per_col = [c for a, c in enumerate(coefs) for _ in range(starts[a + 1] - starts[a])]
    return _to_device(torch.tensor(per_col, dtype=torch.float32), device)


# -- validation ------------------------------------------------------------------------------------
def _check(x, weight, bias, lora_A, lora_B, scales, dropout) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"x must be a tensor with at least one dim, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x.dtype must be one of {DTYPES} for backend='triton', got {x.dtype}")
    K = x.shape[-1]
    if isinstance(weight, Int8Weight):
        CB, SCB = weight
        if CB.dtype != torch.int8 or CB.dim() != 2:
            raise ValueError(f"Int8Weight.CB must be a 2-D int8 tensor, got {CB.dtype} {tuple(CB.shape)}")
        if SCB.shape != (CB.shape[0],) or not SCB.dtype.is_floating_point:
            raise ValueError(f"Int8Weight.SCB must be float of shape ({CB.shape[0]},), got "
                             f"{SCB.dtype} {tuple(SCB.shape)}")
        w, tensors = CB, [CB, SCB]
    else:
        w, tensors = weight, [weight]
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.dtype.is_floating_point:
            raise ValueError(f"weight must be a 2-D float tensor or an Int8Weight, got {w!r:.80}")
        if w.requires_grad:
            raise ValueError("the base weight must be frozen (requires_grad=False) for backend='triton'")
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"x has last dim {K} but the weight has shape {tuple(w.shape)} (out, in)")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        tensors.append(bias)
    n = len(lora_A)
    if not (len(lora_B) == len(scales) == len(dropout) == n):
        raise ValueError(f"lora_A, lora_B, scales, dropout must have one entry per adapter, got lengths "
                         f"{len(lora_A)}, {len(lora_B)}, {len(scales)}, {len(dropout)}")
    for a, (A, B, s, p) in enumerate(zip(lora_A, lora_B, scales, dropout)):
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != K or not 1 <= r <= MAX_RANK:
            raise ValueError(f"lora_A[{a}] must have shape (r, {K}) with 1 <= r <= {MAX_RANK}, "
                             f"got {tuple(A.shape)}")
        if B.shape != (N, r):
            raise ValueError(f"lora_B[{a}] must have shape ({N}, {r}), got {tuple(B.shape)}")
        if not (A.dtype.is_floating_point and B.dtype.is_floating_point):
            raise ValueError(f"adapter {a} must be floating point, got {A.dtype}, {B.dtype}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scales[{a}] must be a finite Python number, got {s!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout[{a}] must be a Python number in [0, 1), got {p!r}")
        tensors += [A, B]
    for t in tensors:
        if t.device != x.device:
            raise ValueError(f"all tensors must be on x's device {x.device}, found one on {t.device}")


# -- autograd function -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    starts: tuple  # rank offset of each adapter in the stack, then the total R
    coefs: tuple  # c_a = s_a / (1 - p_a) when dropout is on, else s_a
    ps: tuple
    dropout: bool  # training and some p_a > 0
    seed: torch.Tensor | None  # int64 [1] on x's device, read by the kernels
    int8: str  # "dequant" | "inloop"
    design: str  # "cublas" | "fused" | "fused_inloop"

    @property
    def n(self) -> int:
        return len(self.coefs)

    def sl(self, a: int) -> slice:
        return slice(self.starts[a], self.starts[a + 1])


def _stack(tensors, dtype, dim):
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    return torch.cat([t.to(dtype) for t in tensors], dim)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scb, bias, plan: _Plan, *ab):
        n, dt, dev = plan.n, x.dtype, x.device
        Kdim = x.shape[-1]
        x2 = x.reshape(-1, Kdim)  # a view when x's strides allow; kernels take any strides
        M, N, R = x2.shape[0], w.shape[0], plan.starts[-1]
        A_cat = _stack(ab[:n], dt, 0) if n else None
        B_cat = _stack(ab[n:], dt, 1) if n else None
        bias_c = None if bias is None else bias.to(dt)
        design, down = plan.design, loop_plan(plan.design, R, plan.dropout)[0]
        inloop8 = scb is not None and plan.int8 == "inloop"
        xa, lora, masks = None, {}, None
        if plan.dropout:
            masks = torch.empty((n, *kl.packed_mask_shape(M, Kdim)), dtype=torch.uint8, device=dev)
        if n:
            xa = _utils.alloc((M, R), dt, dev)
            lora = dict(L=xa, U=B_cat, u_transposed=True)
            if down:
                lora.update(V=A_cat, v_transposed=True, store_l=True,
                            l_coef=_rank_coefs(dev, plan.starts, plan.coefs))
            else:
                for a in range(n):
                    drop = plan.dropout and plan.ps[a] > 0
                    if drop:
                        with nvtx_range("fastfair.lora.draw_mask"):
                            kl.draw_mask_bits(plan.seed, masks[a], plan.ps[a], a, Kdim)
                    elif plan.dropout:
                        masks[a].fill_(255)  # an adapter without dropout keeps everything
                    with nvtx_range("fastfair.lora.down"):
                        kl.lora_down(x2, A_cat, xa, plan.coefs[a], plan.starts[a],
                                     plan.starts[a + 1] - plan.starts[a], bits=masks[a] if drop else None)
        y = _utils.alloc((M, N), dt, dev)
        if inloop8:
            with nvtx_range("fastfair.lora.fused_gemm_int8"):
                kl.lora_gemm(x2, w, y, q_transposed=True, bias=bias_c,
                            col_scale=scb.float() / 127.0, **lora)
        elif design != "cublas":
            W = _dense(w, scb, dt)
            with nvtx_range("fastfair.lora.fused_gemm"):
                kl.lora_gemm(x2, W, y, q_transposed=True, bias=bias_c, **lora)
        else:
            W = _dense(w, scb, dt)
            with nvtx_range("fastfair.lora.base_mm"):
                if bias_c is None:
                    torch.mm(x2, W.t(), out=y)
                else:
                    torch.addmm(bias_c, x2, W.t(), out=y)
            if n:
                with nvtx_range("fastfair.lora.up_addmm"):
                    y.addmm_(xa, B_cat.t())
        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.ab_dtypes = [t.dtype for t in ab]
        ctx.save_for_backward(x2, w, scb, A_cat, B_cat, xa, masks)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        # One function: dX, g, dA and dB share buffers and the in-loop choice, in launch order.
        x2, w, scb, A_cat, B_cat, xa, masks = ctx.saved_tensors
        plan, n = ctx.plan, ctx.plan.n
        dt, dev = x2.dtype, x2.device
        (M, Kdim), N, R = x2.shape, w.shape[0], plan.starts[-1]
        dy2 = dy.reshape(-1, N).to(dt)
        need = ctx.needs_input_grad
        need_x, need_bias = need[0], need[3]
        train_A, train_B = need[5:5 + n], need[5 + n:]
        dx = dbias = None
        dA, dB = [None] * n, [None] * n
        inloop8 = scb is not None and plan.int8 == "inloop"
        # g = dY·B·diag(c) and dB = dYᵀ·xa_s both read dY: in the in-loop form they are taken from
        # the dY tiles that dX's loop holds anyway. dB then adds in fp32 atomics, whose order
        # varies: not under torch.use_deterministic_algorithms.
        atomic_dB = any(train_B) and not torch.are_deterministic_algorithms_enabled()
        design, down = plan.design, loop_plan(plan.design, R, plan.dropout)[1] and need_x
        db32 = None
        if down and atomic_dB:
            db32 = torch.zeros((N, R), dtype=torch.float32, device=dev)

        gs = None
        if n and (any(train_A) or (need_x and not down)):
            gs = _utils.alloc((M, R), dt, dev)
            if not down:
                # gs[:, a] = c_a · dY B_a: the scale rides on B (R×N), never on an M-sized tensor.
                B_s = torch.cat([B_cat[:, plan.sl(a)] * plan.coefs[a] for a in range(n)], 1)
                if atomic_dB and R <= kl.G_DB_MAX_RANK:  # g and dB from one read of dY
                    db32 = torch.zeros((N, R), dtype=torch.float32, device=dev)
                    with nvtx_range("fastfair.lora.bwd_g_dB"):
                        kl.lora_g_db(dy2, B_s, xa, gs, db32)
                else:
                    with nvtx_range("fastfair.lora.bwd_g"):
                        torch.mm(dy2, B_s, out=gs)

        if need_x:
            dx = _utils.alloc((M, Kdim), dt, dev)
            lora = {}
            if n:
                lora = dict(L=gs, U=A_cat)
                if down:
                    lora.update(V=B_cat, store_l=gs is not None, dB=db32, S=None if db32 is None else xa,
                                l_coef=_rank_coefs(dev, plan.starts, plan.coefs))
                if plan.dropout:
                    lora.update(adapter_offs=_group_offsets(dev, plan.starts), n_adapters=n, masks=masks)
            if inloop8:
                with nvtx_range("fastfair.lora.bwd_dx_fused_int8"):
                    kl.lora_gemm(dy2, w, dx, q_transposed=False, row_scale=scb.float() / 127.0, **lora)
            elif design != "cublas":
                W = _dense(w, scb, dt)
                with nvtx_range("fastfair.lora.bwd_dx_fused"):
                    kl.lora_gemm(dy2, W, dx, q_transposed=False, **lora)
            else:
                W = _dense(w, scb, dt)
                with nvtx_range("fastfair.lora.bwd_dx_mm"):
                    torch.mm(dy2, W, out=dx)
                if n and plan.dropout:
                    with nvtx_range("fastfair.lora.bwd_dx_lora"):
                        kl.lora_gemm(dy2, W, dx, q_transposed=False, base=False, accumulate=True, **lora)
                elif n:
                    with nvtx_range("fastfair.lora.bwd_dx_lora"):
                        dx.addmm_(gs, A_cat)
            dx = dx.view(ctx.x_shape)

        for a in range(n):
            sl = plan.sl(a)
            if train_A[a]:
                if plan.dropout and plan.ps[a] > 0:
                    rank = sl.stop - sl.start
                    part = _utils.alloc((kl.dA_splits(M, Kdim, rank, dev), rank, Kdim), torch.float32, dev)
                    with nvtx_range("fastfair.lora.bwd_dA"):
                        kl.lora_dA_partial(gs, x2, part, masks[a], sl.start, rank)
                    dA[a] = part.sum(0).to(ctx.ab_dtypes[a])
                else:
                    with nvtx_range("fastfair.lora.bwd_dA"):
                        dA[a] = (gs[:, sl].t() @ x2).to(ctx.ab_dtypes[a])
            if train_B[a]:
                if db32 is not None:
                    dB[a] = db32[:, sl].to(ctx.ab_dtypes[n + a])
                else:
                    # xa already holds c_a (keep ⊙ x) A_aᵀ: dB_a = dYᵀ xa_a with no rescale.
                    with nvtx_range("fastfair.lora.bwd_dB"):
                        dB[a] = (dy2.t() @ xa[:, sl]).to(ctx.ab_dtypes[n + a])
        if need_bias:
            dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (dx, None, None, dbias, None, *dA, *dB)


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Weight,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropout: Sequence[float],
    training: bool = True,
    design: str = "fused",
    int8: str = "dequant",
) -> torch.Tensor:
    """LoRA linear on Triton; same contract as ``lora_linear_reference`` (without masks).

    ``design``: "cublas", "fused" or "fused_inloop"; ``int8``: "dequant" or "inloop" (fused
    designs). Empty inputs are the dispatcher's (``fastfair.ops.lora``) to route to the reference.
    Raises ``ValueError`` for unsupported input before any kernel runs.
    """
    _check(x, weight, bias, lora_A, lora_B, scales, dropout)
    resolve_backend("triton", x.device)  # CPU tensors only under TRITON_INTERPRET=1
    if design not in TRITON_DESIGNS or int8 not in INT8_MODES:
        raise ValueError(f"design must be one of {TRITON_DESIGNS} and int8 one of {tuple(INT8_MODES)}, "
                         f"got {design!r}, {int8!r}")
    if int8 == "inloop" and design == "cublas":
        raise ValueError("int8='inloop' runs in the fused designs only, not 'cublas'")
    if x.numel() == 0 or weight.shape[0] == 0:
        raise ValueError("lora_linear_triton needs a non-empty x and weight (lora_linear routes empty calls)")
    drop = bool(training) and any(p > 0 for p in dropout)
    starts = [0]
    for A in lora_A:
        starts.append(starts[-1] + A.shape[0])
    plan = _Plan(
        starts=tuple(starts),
        coefs=tuple(float(s) / (1.0 - p) if drop and p > 0 else float(s) for s, p in zip(scales, dropout)),
        ps=tuple(float(p) if drop else 0.0 for p in dropout),
        dropout=drop,
        seed=_draw_seed(x.device) if drop else None,
        int8=int8,
        design=design,
    )
    if isinstance(weight, Int8Weight):
        w, scb = weight.CB, weight.SCB
    else:
        w, scb = weight, None
    return LoRALinearFunction.apply(x, w, scb, bias, plan, *lora_A, *lora_B)


# -- the CUDA kernels of the fastfair::lora_linear custom ops (torch.compile's path) -------------
class _Ctx:
    """Stands in for autograd's ctx so the ops reuse LoRALinearFunction's forward and backward."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _op_plan(lora_A, scales, dropout, seed, design, int8_mode) -> _Plan:
    drop = seed is not None and any(p > 0 for p in dropout)
    starts = [0]
    for A in lora_A:
        starts.append(starts[-1] + A.shape[0])
    return _Plan(starts=tuple(starts), coefs=tuple(float(s) / (1.0 - p) if p > 0 else float(s)
                                                   for s, p in zip(scales, dropout)),
                 ps=tuple(float(p) for p in dropout), dropout=drop, seed=seed if drop else None,
                 int8=int8_mode, design=design)


def op_forward(x, weight, weight_scale, bias, lora_A, lora_B, scales, dropout, seed, design, int8_mode):
    """``(y, xa_s, packed masks)`` as ``fastfair::lora_linear`` returns them."""
    plan = _op_plan(lora_A, scales, dropout, seed, design, int8_mode)
    ctx = _Ctx()
    y = LoRALinearFunction.forward(ctx, x, weight, weight_scale, bias, plan, *lora_A, *lora_B)
    xa, masks = ctx.saved_tensors[5:7]
    M = y.numel() // max(y.shape[-1], 1)
    xa = x.new_empty((M, 0)) if xa is None else xa
    if masks is None:
        masks = x.new_empty((0, *kl.packed_mask_shape(M, x.shape[-1])), dtype=torch.uint8)
    return y, xa, masks


def op_backward(dy, x, weight, weight_scale, lora_A, lora_B, xa, masks, seed, scales, dropout, design, int8_mode,
                needs):
    """``(dx, dbias fp32, dA, dB)`` as ``fastfair::lora_linear_backward`` returns them."""
    n, dt = len(lora_A), x.dtype
    ctx = _Ctx()
    ctx.plan = _op_plan(lora_A, scales, dropout, seed, design, int8_mode)
    ctx.x_shape, ctx.bias_dtype = x.shape, torch.float32
    ctx.ab_dtypes = [t.dtype for t in (*lora_A, *lora_B)]
    # needs_input_grad in the Function's argument order: x, w, scb, bias, plan, *A, *B
    ctx.needs_input_grad = (needs[0], False, False, needs[1], False, *needs[2:])
    A_cat = _stack(lora_A, dt, 0) if n else None
    B_cat = _stack(lora_B, dt, 1) if n else None
    ctx.saved_tensors = (x.reshape(-1, x.shape[-1]), weight, weight_scale, A_cat, B_cat,
                         xa if xa.shape[1] else None, masks if masks.shape[0] else None)
    dx, _, _, dbias, _, *grads = LoRALinearFunction.backward(ctx, dy)
    fill = lambda t: x.new_empty(0) if t is None else t  # noqa: E731  (returns may not alias)
    return fill(dx), fill(dbias), [fill(t) for t in grads[:n]], [fill(t) for t in grads[n:]]

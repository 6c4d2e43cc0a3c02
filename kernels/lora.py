"""Triton kernels of the fused LoRA linear layer (autograd wiring: ``fastfair.ops.lora_triton``).

Notation: ``x`` [M, K], base weight ``W`` [N, K] (dense, or int8 rows with a per-row scale),
stacked adapters ``A`` [R, K] and ``B`` [N, R], adapter ``a`` owning rank rows
``[start_a, start_a + r_a)``, ``c_a = s_a / (1 - p_a)`` its scale with the dropout rescale folded in.

* ``lora_down``: ``xa_s[:, a] = c_a · (keep_a ⊙ x) A_aᵀ`` with the keep-mask unpacked in-kernel
  from its bits (1 bit per element: ``M·K/8`` bytes, against the ``2·M·K`` of a bf16 ``drop(x)``),
  so ``drop(x)`` never exists in memory.
* ``lora_gemm``: ``C = P Q (+ bias) (+ Σ_a keep_a ⊙ (L_a U_a)) (+ C)``, strided so that one kernel
  is both the fused forward ``y = x Wᵀ + b + xa_s Bᵀ`` and the fused input gradient
  ``dX = dY W + Σ_a keep_a ⊙ (g_a A_a)``; int8 ``W`` is loaded as int8 and scaled per output
  row (forward: in the epilogue, exact) or per reduction row (backward: on the tile).
* ``lora_dA``: ``dA_a = g_aᵀ (keep_a ⊙ x)``, split over M for parallelism, mask read from the bits.
* ``lora_g_db``: ``g = dY B_s`` and ``dB += dYᵀ xa_s`` from one read of dY (the cuBLAS and merged
  designs' backward, whose dX is one GEMM that cannot carry them).
* ``draw_mask_bits``: draws one adapter's keep-mask into its packed bits, once per forward;
  ``dropout_mask`` unpacks one for tests and debugging.

Every keep-mask bit is ``rand(seed, m·K + k + a·2⁴⁰) >= p_a`` (Philox, ``tl.rand``): a function of
the element's logical position and the adapter index only, whatever the tiling or the strides of
``x``. It is drawn once per forward (``draw_mask_bits``) and kept as uint8 ``[M, ceil(K/8)]`` per
adapter (bit j of byte i = column 8i + j, ``fastfair.ops.lora.pack_bits``'s layout): the
down-projection, dX and dA unpack it, so a step runs Philox once per element, not three times.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _utils
from .lora_tiles import DOWN_MAX_RANK, G_DB_MAX_RANK, GEMM_TILES, launch_kind, spilling

@triton.jit
def _keep(seed, rows, cols, K, adapter, p):
    # Adapters' Philox counters are 2**40 apart: no collision while M·K < 2**40.
    offs = rows.to(tl.int64)[:, None] * K + cols.to(tl.int64)[None, :]
    offs += tl.cast(adapter, tl.int64) * (1 << 40)
    return tl.rand(seed, offs) >= p


@triton.jit
def _load_keep(bits_ptr, stride_bm, rows, col0, M, n_cols,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # The keep-mask of the tile at rows x [col0, col0 + BLOCK_K); col0 is a multiple of 8 (tiles are).
    rb = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    b = tl.load(bits_ptr + rows.to(tl.int64)[:, None] * stride_bm + rb[None, :],
                mask=(rows < M)[:, None] & (rb < tl.cdiv(n_cols, 8))[None, :], other=0)
    bits = (b.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)) != 0


@triton.jit(do_not_specialize=["adapter"])
def _draw_bits_kernel(bits_ptr, seed_ptr, M, K, adapter, p, stride_bm,
                      BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    # Drawn straight into bytes, bit by bit: packing a [BLOCK_M, BLOCK_K] boolean tile by reshape
    # would put i1 values through shared memory, which sm_90's compiler rejects.
    seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    byte = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.int32)
    for j in tl.static_range(8):
        cols = rb * 8 + j
        keep = _keep(seed, rm, cols, K, adapter, p) & (cols < K)[None, :]  # zero padding, as pack_bits
        byte = byte | (keep.to(tl.int32) << j)
    tl.store(bits_ptr + rm.to(tl.int64)[:, None] * stride_bm + rb[None, :], byte.to(tl.uint8),
             mask=(rm < M)[:, None] & (rb < tl.cdiv(K, 8))[None, :])


@triton.jit(do_not_specialize=["start", "rank"])
def _lora_down_kernel(
    x_ptr, a_ptr, out_ptr, bits_ptr, coef, start, rank, M, K,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or, stride_bm,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk0 = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    r_ok = rr < rank
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + (start + rr).to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        k_ok = rk < K
        # int64 along K too: a column-major x has stride_xk = M, and k·M can pass 2³¹.
        xt = tl.load(x_rows + rk.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if DROPOUT:
            xt = tl.where(_load_keep(bits_ptr, stride_bm, rm, k0, M, K, BLOCK_M, BLOCK_K), xt, 0.0).to(xt.dtype)
        at = tl.load(a_cols + rk[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=INPUT_PRECISION)
    acc *= coef
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + (start + rr)[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_gemm_kernel(
    p_ptr, q_ptr, c_ptr, l_ptr, u_ptr, bias_ptr, col_scale_ptr, row_scale_ptr,
    adapter_offs_ptr, v_ptr, l_coef_ptr, db_ptr, s_ptr,
    bits_ptr, M, N, K, R, n_adapters, M_KEY,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_vk, stride_vr,
    stride_sm, stride_sr, stride_dbk, stride_dbr, stride_ba, stride_bm,
    HAS_BASE: tl.constexpr, HAS_LORA: tl.constexpr, MASKED: tl.constexpr,
    HAS_BIAS: tl.constexpr, COL_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOWN: tl.constexpr, V_PADDED: tl.constexpr, STORE_L: tl.constexpr,
    DB: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # One long body on purpose: every branch is a constexpr, compiled away per launch, and the
    # forward, dX and the LoRA-only accumulate must share the tile loop to fuse at all.
    # DOWN: L = (P·op(V))·diag(l_coef) is accumulated in the base loop from the P tiles already in
    # registers instead of being read from memory (R <= BLOCK_R); programs of column block 0 store
    # it to l_ptr when STORE_L. DB: those programs also add op(P)ᵀ·S into the fp32 [K, R] db_ptr
    # (atomics). Forward: V = Aᵀ, L = xa_s. dX: V = B, L = g_s, S = xa_s, db = dB.
    # Grouped program order: GROUP_M row blocks share each Q column block while it is in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    dtype = p_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    rr_all = tl.arange(0, BLOCK_R)
    r_all_ok = rr_all < R
    if DOWN:
        lacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        v_cols = v_ptr + rr_all[None, :] * stride_vr
    if DB:
        s_tile = tl.load(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr_all[None, :] * stride_sr,
                         mask=m_ok[:, None] & r_all_ok[None, :], other=0.0)

    if HAS_BASE:
        p_rows = p_ptr + rm.to(tl.int64)[:, None] * stride_pm
        q_cols = q_ptr + rn.to(tl.int64)[None, :] * stride_qn
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            pt = tl.load(p_rows + rk.to(tl.int64)[None, :] * stride_pk, mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            qt = tl.load(q_cols + rk.to(tl.int64)[:, None] * stride_qk, mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if ROW_SCALE:
                # int8 rows scaled along the reduction: dequantize the tile as the reference does.
                rs = tl.load(row_scale_ptr + rk, mask=k_ok, other=0.0)
                qt = (qt.to(tl.float32) * rs[:, None]).to(dtype)
            else:
                qt = qt.to(dtype)  # int8 values are exact in 16-bit floats
            acc = tl.dot(pt, qt, acc, input_precision=INPUT_PRECISION)
            if DOWN:
                # R/BLOCK_N more tensor-core work, no extra pass over P: every column block
                # recomputes its row block's L.
                if V_PADDED:  # V has BLOCK_R zero-padded columns: no rank mask, aligned rows
                    vt = tl.load(v_cols + rk[:, None] * stride_vk, mask=k_ok[:, None], other=0.0).to(dtype)
                else:
                    vt = tl.load(v_cols + rk[:, None] * stride_vk, mask=k_ok[:, None] & r_all_ok[None, :],
                                 other=0.0).to(dtype)
                lacc = tl.dot(pt, vt, lacc, input_precision=INPUT_PRECISION)
            if DB:
                if pid_n == 0:
                    part = tl.dot(tl.trans(pt), s_tile, input_precision=INPUT_PRECISION)
                    # Relaxed: only the sum matters, read after the kernel ends (vector atomics).
                    tl.atomic_add(db_ptr + rk[:, None] * stride_dbk + rr_all[None, :] * stride_dbr, part,
                                  mask=k_ok[:, None] & r_all_ok[None, :], sem="relaxed")
        if COL_SCALE:
            # Per-output-row int8 scale factors out of the sum over K: one multiply per output.
            acc *= tl.load(col_scale_ptr + rn, mask=n_ok, other=0.0)[None, :]

    if DOWN:
        lacc *= tl.load(l_coef_ptr + rr_all, mask=r_all_ok, other=0.0)[None, :]
        # Rounded to the input dtype, as the unfused path stores it before using it.
        lval = lacc.to(dtype)
        if STORE_L:
            if pid_n == 0:
                tl.store(l_ptr + rm.to(tl.int64)[:, None] * stride_lm + rr_all[None, :] * stride_lr,
                         lval, mask=m_ok[:, None] & r_all_ok[None, :])

    if HAS_LORA:
        u_cols = u_ptr + rn.to(tl.int64)[None, :] * stride_un
        if DOWN:
            ut = tl.load(u_cols + rr_all[:, None] * stride_ur, mask=r_all_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if MASKED:
                for a in range(0, n_adapters):
                    a_start = tl.load(adapter_offs_ptr + a)
                    a_end = tl.load(adapter_offs_ptr + a + 1)
                    # Registers cannot be sliced by a runtime range: zero the other adapters' columns.
                    lt = tl.where(((rr_all >= a_start) & (rr_all < a_end))[None, :], lval, 0.0).to(dtype)
                    lr = tl.dot(lt, ut, input_precision=INPUT_PRECISION)
                    keep = _load_keep(bits_ptr + tl.cast(a, tl.int64) * stride_ba, stride_bm, rm,
                                      pid_n * BLOCK_N, M, N, BLOCK_M, BLOCK_N)
                    acc += tl.where(keep, lr, 0.0)
            else:
                acc = tl.dot(lval, ut, acc, input_precision=INPUT_PRECISION)
        else:
            l_rows = l_ptr + rm.to(tl.int64)[:, None] * stride_lm
            if MASKED:
                for a in range(0, n_adapters):
                    a_start = tl.load(adapter_offs_ptr + a)
                    a_end = tl.load(adapter_offs_ptr + a + 1)
                    lr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for r0 in range(a_start, a_end, BLOCK_R):
                        rr = r0 + tl.arange(0, BLOCK_R)
                        r_ok = rr < a_end
                        lt = tl.load(l_rows + rr[None, :] * stride_lr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                        ut = tl.load(u_cols + rr[:, None] * stride_ur, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                        lr = tl.dot(lt, ut, lr, input_precision=INPUT_PRECISION)
                    keep = _load_keep(bits_ptr + tl.cast(a, tl.int64) * stride_ba, stride_bm, rm,
                                      pid_n * BLOCK_N, M, N, BLOCK_M, BLOCK_N)
                    acc += tl.where(keep, lr, 0.0)
            else:
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    r_ok = rr < R
                    lt = tl.load(l_rows + rr[None, :] * stride_lr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                    ut = tl.load(u_cols + rr[:, None] * stride_ur, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = tl.dot(lt, ut, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["start", "rank"])
def _lora_dA_kernel(
    g_ptr, x_ptr, out_ptr, bits_ptr, start, rank, M, K, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_os, stride_or, stride_bm,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = rk < K
    r_ok = rr < rank
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        gt = tl.load(g_ptr + rm.to(tl.int64)[None, :] * stride_gm + (start + rr)[:, None] * stride_gr,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        keep = _load_keep(bits_ptr, stride_bm, rm, tl.program_id(0) * BLOCK_K, M, K, BLOCK_M, BLOCK_K)
        xt = tl.where(keep, xt, 0.0).to(xt.dtype)
        acc = tl.dot(gt, xt, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + split.to(tl.int64) * stride_os + rr[:, None] * stride_or + rk[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _lora_g_db_kernel(
    dy_ptr, b_ptr, xa_ptr, g_ptr, db_ptr, M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xm, stride_xr, stride_gm, stride_gr,
    stride_dbn, stride_dbr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # g = dY·B_s and dB += dYᵀ·xa_s from one read of dY: each program owns a row block of g (its
    # whole reduction over N) and adds its row block's share of dB (a reduction over M) by atomics.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    xa = tl.load(xa_ptr + rm.to(tl.int64)[:, None] * stride_xm + rr[None, :] * stride_xr,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dy = tl.load(dy_rows + rn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0)
        g = tl.dot(dy, b, g, input_precision=INPUT_PRECISION)
        part = tl.dot(tl.trans(dy), xa, input_precision=INPUT_PRECISION)
        # Relaxed: only the sum matters, read after the kernel ends.
        tl.atomic_add(db_ptr + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr, part,
                      mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    tl.store(g_ptr + rm.to(tl.int64)[:, None] * stride_gm + rr[None, :] * stride_gr, g.to(g_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


# -- configurations ------------------------------------------------------------------------------

def _gemm_configs() -> list[triton.Config]:
    """Hopper candidates for the fused GEMM (``lora_tiles.GEMM_TILES``)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in GEMM_TILES]


# Autotuning may run the kernel several times: restore C so ACCUMULATE launches stay correct, and
# (DB launches) zero dB, which the atomics add into. Two wrappers, because some Triton releases
# (3.6, for one) zero every reset_to_zero argument without a None check, and launches without DB
# pass db_ptr=None.
# Keyed on M's power-of-two bucket, not M: a new batch size (a last partial batch) must not
# trigger a new tuning run.
# HAS_BASE/ACCUMULATE and the operands' strides (forward reads Q transposed, dX does not) change
# the best tile too: without them the forward and dX would share one tuning.
_TUNE_KEY = ["M_KEY", "N", "K", "R", "HAS_BASE", "HAS_LORA", "MASKED", "COL_SCALE", "ROW_SCALE", "DOWN",
             "ACCUMULATE", "stride_qk", "stride_qn", "stride_pk"]
def _tile(cfg: triton.Config) -> tuple:
    kw = cfg.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)


def choosable_tiles(kind: str) -> list[tuple]:
    """The tiles the autotuner may pick for a launch kind: those not known to spill
    (``lora_tiles.spilling``)."""
    bad = spilling(kind)
    return [t for t in GEMM_TILES if t not in bad]


def prune_spilling(configs, named_args, **flags):
    """Autotune only over the tiles that do not spill for this launch's kind."""
    ok = choosable_tiles(launch_kind(flags))
    return [c for c in configs if _tile(c) in ok]


_PRUNE = {"early_config_prune": prune_spilling}
_lora_gemm_tuned = triton.autotune(configs=_gemm_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE,
                                   restore_value=["c_ptr"])(_lora_gemm_kernel)
_lora_gemm_tuned_db = triton.autotune(configs=_gemm_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE,
                                      restore_value=["c_ptr"], reset_to_zero=["db_ptr"])(_lora_gemm_kernel)


def _block_r(rank: int) -> int:
    return _utils.pow2(rank, least=16, cap=64)


@functools.cache
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fixed_gemm_meta(dtype: torch.dtype) -> dict:
    if _utils.interpreting():
        # Small tiles so the tests' odd shapes cross tile borders; one config (no autotune).
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2 if fp32 else 3)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting so the fused path agrees with cuBLAS on it.
    if dtype == torch.float32 and not _utils.tf32_allowed():
        return "ieee"
    return "tf32"


# -- launchers (thin: checks are done by the caller in fastfair.ops.lora_triton) ------------------

def seed_tensor(seed, device) -> torch.Tensor:
    """The kernels read their Philox seed from device memory (int64 [1]), so a seed drawn on the
    device never travels to the host (no ``.item()``, no graph break). Ints are for tests."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([seed], dtype=torch.int64, device=device)


def packed_mask_shape(M: int, K: int) -> tuple[int, int]:
    """The shape of one adapter's bit-packed keep-mask: uint8 ``[M, ceil(K/8)]``."""
    return M, (K + 7) // 8


def _check_bits(bits, M: int, K: int, who: str) -> None:
    if bits is None or bits.dtype != torch.uint8 or tuple(bits.shape) != packed_mask_shape(M, K) \
            or bits.stride(1) != 1:
        raise ValueError(f"{who}: bits must be a row-contiguous uint8 tensor of shape {packed_mask_shape(M, K)}")


def draw_mask_bits(seed, bits, p: float, adapter: int, K: int) -> None:
    """Draw adapter ``adapter``'s keep-mask into ``bits`` (uint8 ``packed_mask_shape(M, K)``): the one
    Philox draw of a step, read by ``lora_down``, the masked dX ``lora_gemm`` and ``lora_dA``."""
    M = bits.shape[0]
    _check_bits(bits, M, K, "draw_mask_bits")
    block_m, block_b = (32, 8) if _utils.interpreting() else (32, 16)
    grid = (triton.cdiv(M, block_m), triton.cdiv(bits.shape[1], block_b))
    with _utils.on_device(bits.device):
        _draw_bits_kernel[grid](bits, seed_tensor(seed, bits.device), M, K, adapter, float(p), bits.stride(0),
                                BLOCK_M=block_m, BLOCK_B=block_b)


def dropout_mask(seed, M: int, K: int, p: float, adapter: int, device) -> torch.Tensor:
    """The keep-mask (bool [M, K]) that the kernels draw for adapter ``adapter`` with ``seed``."""
    bits = torch.empty(packed_mask_shape(M, K), dtype=torch.uint8, device=device)
    draw_mask_bits(seed, bits, p, adapter, K)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, :K].bool()


def lora_down(x, A, out, coef, start, rank, bits=None) -> None:
    """``out[:, start:start+rank] = coef · (keep ⊙ x) A[start:start+rank]ᵀ``, ``keep`` unpacked from
    ``bits`` (``draw_mask_bits``); without ``bits``, no dropout."""
    M, K = x.shape
    dropout = bits is not None
    if dropout:
        _check_bits(bits, M, K, "lora_down")
    block_r = _block_r(rank)
    block_m, block_k, warps = (32, 32, 4) if _utils.interpreting() else (64, 64, 4)
    grid = (triton.cdiv(M, block_m), triton.cdiv(rank, block_r))
    with _utils.on_device(x.device):
        _lora_down_kernel[grid](
            x, A, out, bits, float(coef), start, rank, M, K,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), out.stride(0), out.stride(1),
            bits.stride(0) if dropout else 0,
            DROPOUT=dropout, INPUT_PRECISION=_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
        )


def lora_gemm(P, Q, C, *, q_transposed: bool, L=None, U=None, u_transposed: bool = False,
              bias=None, col_scale=None, row_scale=None, base: bool = True, accumulate: bool = False,
              adapter_offs=None, n_adapters: int = 0, masks=None,
              V=None, v_transposed: bool = False, l_coef=None, store_l: bool = False,
              dB=None, S=None) -> None:
    """``C (+)= P·op(Q) [·col_scale] (+ bias) + Σ_g keep_g ⊙ (L_g op(U)_g)``.

    ``op(Q)`` is ``Qᵀ`` when ``q_transposed`` (Q stored [N, K], as a linear weight), else ``Q``
    ([K, N]); same for ``U`` and ``V``. ``adapter_offs`` (device int32 [n_adapters+1]) with
    ``masks`` (uint8 [n_adapters, M, ceil(N/8)], the forward's packed draws) turn on the
    per-adapter dropout masks at (row, column) of ``C``.

    With ``V`` (R <= ``DOWN_MAX_RANK``), ``L = P·op(V)·diag(l_coef)`` is computed inside the base
    loop rather than read: ``L`` (if given) is then an output, written when ``store_l``. With ``dB``
    (fp32 [K, R], zeroed by the caller), ``dB += Pᵀ S`` is accumulated in the same loop.
    """
    # Long because it is argument plumbing for one kernel with many optional operands.
    M, K = P.shape
    N = C.shape[1]
    down = V is not None
    if down:
        R = V.shape[0] if v_transposed else V.shape[1]
        if not base or R > DOWN_MAX_RANK or l_coef is None:
            raise ValueError(f"lora_gemm: V needs the base product, l_coef and R <= {DOWN_MAX_RANK}, got R={R}")
        block_r = _block_r(R)
        v_padded = not v_transposed and R < block_r
        if v_padded:
            # V [K, R] is read along R, its contiguous dim: pad it to BLOCK_R zero columns so the
            # tile load needs no rank mask and its rows are 16-aligned (else Hopper's pipeliner
            # falls back to synchronous loads inside the loop). K×BLOCK_R: a few hundred KiB.
            V = torch.nn.functional.pad(V, (0, block_r - R))
        svk, svr = (V.stride(1), V.stride(0)) if v_transposed else (V.stride(0), V.stride(1))
    else:
        R = 0 if L is None else L.shape[1]
        svk = svr = 0
        v_padded = False
    if dB is not None and (not down or S is None or dB.dtype != torch.float32):
        raise ValueError("lora_gemm: dB needs V, S and a float32 buffer")
    sqk, sqn = (Q.stride(1), Q.stride(0)) if q_transposed else (Q.stride(0), Q.stride(1))
    has_lora = R > 0
    if has_lora:
        sur, sun = (U.stride(1), U.stride(0)) if u_transposed else (U.stride(0), U.stride(1))
    else:
        U, sur, sun = None, 0, 0
    slm, slr = (L.stride(0), L.stride(1)) if L is not None else (0, 0)
    ssm, ssr = (S.stride(0), S.stride(1)) if S is not None else (0, 0)
    sdk, sdr = (dB.stride(0), dB.stride(1)) if dB is not None else (0, 0)
    masked = adapter_offs is not None
    if masked and (masks is None or masks.dtype != torch.uint8 or masks.dim() != 3
                   or tuple(masks.shape[1:]) != packed_mask_shape(M, N) or masks.stride(2) != 1):
        raise ValueError(f"lora_gemm: adapter masks must be uint8 [n_adapters, {M}, {(N + 7) // 8}]")
    sba, sbm = (masks.stride(0), masks.stride(1)) if masked else (0, 0)
    # Absent operands are None: never read (their constexpr switch is off), and autotune's
    # reset_to_zero skips a None db_ptr instead of zeroing whatever stood in for it.
    args = (
        P, Q, C, L, U, bias, col_scale, row_scale, adapter_offs if masked else None,
        V, l_coef, dB, S, masks if masked else None, M, N, K, R, n_adapters, _utils.pow2(M),
        P.stride(0), P.stride(1), sqk, sqn, C.stride(0), C.stride(1),
        slm, slr, sur, sun, svk, svr, ssm, ssr, sdk, sdr, sba, sbm,
    )
    flags = dict(
        HAS_BASE=base, HAS_LORA=has_lora, MASKED=masked, HAS_BIAS=bias is not None,
        COL_SCALE=col_scale is not None, ROW_SCALE=row_scale is not None, ACCUMULATE=accumulate,
        DOWN=down, V_PADDED=v_padded, STORE_L=down and store_l and L is not None, DB=dB is not None,
        INPUT_PRECISION=_precision(P.dtype), BLOCK_R=_block_r(R),
    )
    if not _utils.interpreting() and P.is_cuda and _is_hopper(P.device.index or 0):
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        with _utils.on_device(P.device):
            (_lora_gemm_tuned_db if dB is not None else _lora_gemm_tuned)[grid](*args, **flags)
        return
    meta = _fixed_gemm_meta(P.dtype)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    with _utils.on_device(P.device):
        _lora_gemm_kernel[grid](*args, **flags, **meta)


def _dA_plan(M: int, K: int, rank: int, device) -> tuple[int, int, int, int, int, int]:
    block_r = _block_r(rank)
    if _utils.interpreting() or device.type != "cuda":
        block_m, block_k, warps, target = 16, 32, 4, 2
    else:
        block_m, block_k, warps, target = 64, 64, 4, 4 * _sm_count(device.index or 0)
    tiles = triton.cdiv(K, block_k) * triton.cdiv(rank, block_r)
    # Split the long reduction over M so the grid fills the GPU; the splits are summed by torch.
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(target, tiles)))
    rows = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return block_m, block_k, block_r, warps, triton.cdiv(M, rows), rows


def dA_splits(M: int, K: int, rank: int, device) -> int:
    """How many M-splits ``lora_dA_partial`` writes (the caller allocates ``[splits, rank, K]``)."""
    return _dA_plan(M, K, rank, device)[4]


def lora_dA_partial(g, x, out, bits, start, rank) -> None:
    """``out[s] = g[rows_s, start:start+rank]ᵀ (keep ⊙ x)[rows_s]``: fp32 partials over M-splits,
    ``keep`` unpacked from ``bits`` (the forward's ``draw_mask_bits``)."""
    M, K = x.shape
    _check_bits(bits, M, K, "lora_dA_partial")
    block_m, block_k, block_r, warps, splits, rows = _dA_plan(M, K, rank, x.device)
    grid = (triton.cdiv(K, block_k), splits, triton.cdiv(rank, block_r))
    with _utils.on_device(x.device):
        _lora_dA_kernel[grid](
            g, x, out, bits, start, rank, M, K, rows,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), bits.stride(0),
            INPUT_PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=warps,
        )



def g_db_tile(dtype: torch.dtype, R: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) of ``lora_g_db``: fp32 at R > 16 halves the rows, as 64 rows
    spill 7 KB per thread on sm_90 (tests/hopper_compile.py)."""
    return (32, 64, 4) if dtype == torch.float32 and R > 16 else (64, 64, 4)


def lora_g_db(dy, B_s, xa, g, db) -> None:
    """``g = dY·B_s`` (any float dtype, [M, R]) and ``db += dYᵀ·xa`` (fp32 [N, R], zeroed by the
    caller) reading dY once; R <= ``G_DB_MAX_RANK``. The atomics sum in a varying order: callers
    keep two GEMMs under ``torch.use_deterministic_algorithms``."""
    M, N = dy.shape
    R = B_s.shape[1]
    if not 0 < R <= G_DB_MAX_RANK or db.dtype != torch.float32 or tuple(db.shape) != (N, R) \
            or tuple(g.shape) != (M, R) or tuple(xa.shape) != (M, R):
        raise ValueError(f"lora_g_db: need 0 < R <= {G_DB_MAX_RANK}, g/xa [{M}, R], db fp32 [{N}, R]; "
                         f"got R={R}, g {tuple(g.shape)}, xa {tuple(xa.shape)}, db {db.dtype} {tuple(db.shape)}")
    block_m, block_n, warps = (32, 32, 4) if _utils.interpreting() else g_db_tile(dy.dtype, R)
    with _utils.on_device(dy.device):
        _lora_g_db_kernel[(triton.cdiv(M, block_m),)](
            dy, B_s, xa, g, db, M, N, R,
            dy.stride(0), dy.stride(1), B_s.stride(0), B_s.stride(1), xa.stride(0), xa.stride(1),
            g.stride(0), g.stride(1), db.stride(0), db.stride(1),
            INPUT_PRECISION=_precision(dy.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R),
            num_warps=warps,
        )

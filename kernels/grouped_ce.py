"""Triton kernels of the per-group cross-entropy (see ``fastfair.ops.grouped_ce``).

Forward: one pass over each row of logits with an online log-sum-exp over blocks of C, the row
loss, the row's log-sum-exp kept for backward, and the group sums and counts reduced in the same
kernel with atomics. Backward: ``dlogits = coef_i · (softmax − onehot_smoothed)`` in one pass
into a new tensor. Both tile ``BLOCK_N`` rows × ``BLOCK_C`` columns so small C still fills a block.

Rows whose label is neither ``ignore_index`` nor in [0, C), or whose group is outside [0, G), are
"bad": never read through their label, left out of every group, given a NaN loss, and recorded
in ``flags`` (int64[4]: bad-label count, first bad-label key, bad-group count, first bad-group
key; key = row·2³² + value clamped to int32 and shifted by 2³¹, so the minimum key is the first
bad row). Nothing here synchronizes with the host.

The launchers (``grouped_ce_forward``, ``grouped_ce_backward``) take checked, contiguous-row
tensors; checks and autograd live in ``fastfair.ops.grouped_ce``.
"""
import torch
import triton
import triton.language as tl

from . import _utils

# constexpr: the compiler rejects plain globals in a kernel (the interpreter does not).
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _row_masks(labels_ptr, groups_ptr, rows, n_rows, n_cols, n_groups, ignore_index):
    row_in = rows < n_rows
    lab = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
    grp = tl.load(groups_ptr + rows, mask=row_in, other=0).to(tl.int64)
    used = row_in & (lab != ignore_index)
    bad_label = used & ((lab < 0) | (lab >= n_cols))
    bad_group = used & ((grp < 0) | (grp >= n_groups))
    valid = used & (~bad_label) & (~bad_group)
    return lab, grp, valid, bad_label, bad_group


@triton.jit
def _record_bad(flags_ptr, bad, value, rows):
    n_bad = tl.sum(bad.to(tl.int64), axis=0)
    v = tl.minimum(tl.maximum(value, INT32_MIN), INT32_MAX) - INT32_MIN
    key = rows.to(tl.int64) * 4294967296 + v
    key = tl.min(tl.where(bad, key, 9223372036854775807), axis=0)
    # Masked scalar atomics: rows that are fine cost no atomic traffic.
    tl.atomic_add(flags_ptr, n_bad, mask=n_bad > 0)
    tl.atomic_min(flags_ptr + 1, key, mask=n_bad > 0)


@triton.jit
def grouped_ce_fwd_kernel(
    logits_ptr, stride_row, labels_ptr, groups_ptr,
    loss_ptr, lse_ptr, group_sum_ptr, group_count_ptr, flags_ptr,
    n_rows, n_cols, n_groups, ignore_index, smoothing,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
    ONE_HOT_GROUPS: tl.constexpr, SMOOTH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lab, grp, valid, bad_label, bad_group = _row_masks(
        labels_ptr, groups_ptr, rows, n_rows, n_cols, n_groups, ignore_index)
    # int64 offsets: N·C passes 2³¹ at real sizes (64k rows × 128k classes).
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    cols0 = tl.arange(0, BLOCK_C)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    xsum = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + cols0
        mask = valid[:, None] & (cols < n_cols)[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A block of only -inf would make exp(-inf - -inf) = NaN; shift by 0 instead. +inf or NaN
        # logits still make s NaN (inf - inf), so such rows get a NaN loss as in PyTorch.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use[:, None]), axis=1)
        m = m_new
        if SMOOTH:
            xsum += tl.sum(tl.where(mask, x, 0.0), axis=1)
    # Unread rows (ignored, bad) have s = 0; log(1) keeps their unused lse finite.
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(valid, s, 1.0))

    lab_safe = tl.where(valid, lab, 0)
    x_y = tl.load(row_ptr + lab_safe, mask=valid, other=0.0).to(tl.float32)
    if SMOOTH:
        loss = lse - (1.0 - smoothing) * x_y - (smoothing / n_cols) * xsum
    else:
        loss = lse - x_y
    loss = tl.where(valid, loss, 0.0)
    row_in = rows < n_rows
    out = tl.where(bad_label | bad_group, float("nan"), loss)
    tl.store(loss_ptr + rows, out, mask=row_in)
    tl.store(lse_ptr + rows, lse, mask=row_in)

    if ONE_HOT_GROUPS:
        # Few groups: reduce the tile to one partial sum per group, then one atomic per group
        # present in the tile instead of one per row (rows of a group contend on one address).
        gi = tl.arange(0, BLOCK_G)
        hit = (grp[:, None] == gi[None, :]) & valid[:, None]
        gsum = tl.sum(tl.where(hit, loss[:, None], 0.0), axis=0)
        gcnt = tl.sum(hit.to(tl.float32), axis=0)
        tl.atomic_add(group_sum_ptr + gi, gsum, mask=gcnt > 0)
        tl.atomic_add(group_count_ptr + gi, gcnt, mask=gcnt > 0)
    else:
        grp_safe = tl.where(valid, grp, 0)
        tl.atomic_add(group_sum_ptr + grp_safe, loss, mask=valid)
        tl.atomic_add(group_count_ptr + grp_safe, tl.where(valid, 1.0, 0.0), mask=valid)

    _record_bad(flags_ptr, bad_label, lab, rows)
    _record_bad(flags_ptr + 2, bad_group, grp, rows)


@triton.jit
def grouped_ce_bwd_kernel(
    logits_ptr, stride_row, labels_ptr, groups_ptr, lse_ptr,
    grad_loss_ptr, grad_sum_ptr, dlogits_ptr,
    n_rows, n_cols, n_groups, ignore_index, smoothing,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_SUM: tl.constexpr, SMOOTH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    lab, grp, valid, bad_label, bad_group = _row_masks(
        labels_ptr, groups_ptr, rows, n_rows, n_cols, n_groups, ignore_index)
    # A row's loss enters its own entry of per_sample_loss and its group's sum, so its upstream
    # gradient is the sum of the two; ignored and bad rows have none.
    coef = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_GRAD_LOSS:
        coef += tl.load(grad_loss_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    if HAS_GRAD_SUM:
        coef += tl.load(grad_sum_ptr + tl.where(valid, grp, 0), mask=valid, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)

    rows64 = rows.to(tl.int64)
    row_ptr = logits_ptr + rows64 * stride_row
    out_ptr = dlogits_ptr + rows64 * n_cols
    cols0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + cols0
        col_in = cols < n_cols
        x = tl.load(row_ptr[:, None] + cols[None, :],
                    mask=valid[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None])
        target = tl.where(cols[None, :] == lab[:, None], 1.0 - smoothing, 0.0)
        if SMOOTH:
            target += smoothing / n_cols
        g = tl.where(valid[:, None], coef[:, None] * (g - target), 0.0)
        tl.store(out_ptr[:, None] + cols[None, :], g.to(dlogits_ptr.dtype.element_ty),
                 mask=row_in[:, None] & col_in[None, :])


# -- launchers -----------------------------------------------------------------------------------
MAX_TILE = 4096  # elements per program: BLOCK_N rows × BLOCK_C columns


def tiles(n_cols: int, num_groups: int):
    """(BLOCK_N, BLOCK_C, BLOCK_G, one-hot group reduction, warps) for C classes, G groups."""
    block_c = _utils.pow2(n_cols, cap=MAX_TILE)
    block_n = max(1, min(MAX_TILE // block_c, 128))
    block_g = _utils.pow2(num_groups)
    num_warps = 8 if block_n * block_c >= 4096 else 4
    return block_n, block_c, block_g, block_g <= 64, num_warps


def grouped_ce_forward(logits, labels, groups, num_groups, ignore_index, smoothing, flags):
    """``(loss[N], lse[N], group_sum[G], group_count[G])``, fp32; bad rows recorded in ``flags``."""
    n, c = logits.shape
    dev = logits.device
    loss = _utils.alloc(n, torch.float32, dev)
    lse = _utils.alloc(n, torch.float32, dev)
    group_sum = torch.zeros(num_groups, dtype=torch.float32, device=dev)  # atomics add into these
    group_count = torch.zeros(num_groups, dtype=torch.float32, device=dev)
    bn, bc, bg, one_hot, warps = tiles(c, num_groups)
    if n:
        with _utils.on_device(dev):
            grouped_ce_fwd_kernel[(_utils.cdiv(n, bn),)](
                logits, logits.stride(0), labels, groups,
                loss, lse, group_sum, group_count, flags,
                n, c, num_groups, ignore_index, float(smoothing),
                BLOCK_N=bn, BLOCK_C=bc, BLOCK_G=bg, ONE_HOT_GROUPS=one_hot,
                SMOOTH=smoothing > 0, num_warps=warps,
            )
    return loss, lse, group_sum, group_count


def grouped_ce_backward(logits, labels, groups, lse, grad_loss, grad_sum, num_groups, ignore_index,
                        smoothing):
    """``dlogits`` (a new tensor, logits' dtype) for upstream gradients of loss and group_sum."""
    n, c = logits.shape
    # A new tensor: writing into logits would corrupt it for anyone else who reads it.
    dlogits = _utils.alloc((n, c), logits.dtype, logits.device)
    bn, bc, _, _, warps = tiles(c, num_groups)
    if n:
        with _utils.on_device(logits.device):
            grouped_ce_bwd_kernel[(_utils.cdiv(n, bn),)](
                logits, logits.stride(0), labels, groups, lse,
                grad_loss if grad_loss is not None else lse,
                grad_sum if grad_sum is not None else lse,
                dlogits, n, c, num_groups, ignore_index, smoothing,
                BLOCK_N=bn, BLOCK_C=bc, HAS_GRAD_LOSS=grad_loss is not None,
                HAS_GRAD_SUM=grad_sum is not None, SMOOTH=smoothing > 0, num_warps=warps,
            )
    return dlogits

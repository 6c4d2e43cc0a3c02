"""Compile what ships for sm_90 with no GPU, and read each kernel's registers, spills and shared memory.

The interpreter accepts code the compiler rejects, and a config that compiles can still spill: this
builds every kernel variant the dispatcher can launch, with the specialization Triton gives real
launches (pointers and multiple-of-16 integers marked 16-divisible, unit strides as constants), and
reads the resources from the cubin (``cuobjdump -res-usage``).

    python tests/hopper_compile.py            # the representative subset (the default test)
    python tests/hopper_compile.py --full     # every autotune config × flag set × BLOCK_R

Prints one JSON object per compiled variant. Must run with ``TRITON_INTERPRET=0`` (set below,
before Triton is imported).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"  # real @triton.jit functions, compiled, not interpreted

VIT = dict(M=256 * 197, K=768, N=2304)  # ViT-B qkv at batch 256: the strides real launches see
GEMM_PTRS = ("p_ptr", "q_ptr", "c_ptr", "l_ptr", "u_ptr", "bias_ptr", "v_ptr", "s_ptr")
# Each flag set is one launch the LoRA designs make (fastfair.ops.lora_triton); q transposed means
# W read as [N, K] (forward), else [K, N] (dX). stride_qk = 1 marks the forward's layout.
GEMM_FLAGS = {
    "fwd": dict(HAS_LORA=True, HAS_BIAS=True, q_t=True),  # fused: y = xWᵀ + b + xa_s Bᵀ
    "fwd_inloop": dict(HAS_LORA=True, HAS_BIAS=True, DOWN=True, STORE_L=True, q_t=True),
    "fwd_int8": dict(HAS_LORA=True, HAS_BIAS=True, COL_SCALE=True, q="*i8", q_t=True),
    "dx": dict(HAS_LORA=True),  # dX = dY W + g_s A, no dropout
    "dx_masked": dict(HAS_LORA=True, MASKED=True),  # dropout masks unpacked per adapter
    "dx_inloop_db": dict(HAS_LORA=True, DOWN=True, V_PADDED=True, STORE_L=True, DB=True),  # p = 0
    "dx_inloop_db_masked": dict(HAS_LORA=True, MASKED=True, DOWN=True, V_PADDED=True, STORE_L=True, DB=True),
    "dx_int8": dict(HAS_LORA=True, MASKED=True, ROW_SCALE=True, q="*i8"),
    "cublas_masked_lora": dict(HAS_BASE=False, HAS_LORA=True, MASKED=True, ACCUMULATE=True),
}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _build(fn, types: dict, consts: dict, aligned: tuple, **opts):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: types.get(n, "i32") for n in fn.arg_names}
    sig.update({k: "constexpr" for k in consts})
    # Triton marks 16-byte-aligned pointers and multiple-of-16 ints as divisible by 16 ("D"):
    # without it the loads stay scalar (the old test's 128 scalar loads, 0 cp.async).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in aligned and n not in consts}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _resources(kernel) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    use = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return dict(regs=int(use["REG"]), stack=int(use["STACK"]), local=int(use["LOCAL"]),
                shared=kernel.metadata.shared, cp_async="cp.async" in kernel.asm["ptx"])


def _gemm_case(name, flag_set, dtype, tile, block_r):
    from fastfair.kernels import lora as kl
    from fastfair.kernels.lora_tiles import launch_kind

    f = dict(GEMM_FLAGS[flag_set])
    q_t, q = f.pop("q_t", False), f.pop("q", DTYPES[dtype])
    types = {n: DTYPES[dtype] for n in GEMM_PTRS}
    types.update(q_ptr=q, col_scale_ptr="*fp32", row_scale_ptr="*fp32", adapter_offs_ptr="*i32",
                 l_coef_ptr="*fp32", db_ptr="*fp32", bits_ptr="*u8")
    flags = dict(HAS_BASE=True, HAS_LORA=False, MASKED=False, HAS_BIAS=False, COL_SCALE=False,
                 ROW_SCALE=False, ACCUMULATE=False, DOWN=False, V_PADDED=False, STORE_L=False, DB=False,
                 INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_R=block_r)
    flags.update(f)
    bm, bn, bk, warps, stages = tile
    consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    # Unit strides are constants in a real launch: row-major x, W [N, K] (forward) or [K, N] (dX).
    consts.update(stride_pk=1, stride_cn=1, stride_lr=1, stride_sr=1, stride_dbr=1,
                  **({"stride_qk": 1} if q_t else {"stride_qn": 1}))
    aligned = (*GEMM_PTRS, "col_scale_ptr", "row_scale_ptr", "db_ptr", "M", "N", "K", "stride_pm",
               "stride_qk", "stride_qn", "stride_cm", "stride_lm", "stride_ur", "stride_un", "stride_vk",
               "stride_sm", "stride_dbk", "bits_ptr", "stride_ba", "stride_bm")
    k = _build(kl._lora_gemm_kernel, types, consts, aligned, num_warps=warps, num_stages=stages)
    return dict(kernel="lora_gemm", case=name, kind=launch_kind(flags), tile=list(tile), **_resources(k))


def _small_case(name, which, dtype, block_r):
    from fastfair.kernels import grouped_ce as kg
    from fastfair.kernels import lora as kl

    t = DTYPES[dtype]
    prec = "ieee" if dtype == "fp32" else "tf32"
    if which == "down":
        k = _build(kl._lora_down_kernel, dict(x_ptr=t, a_ptr=t, out_ptr=t, bits_ptr="*u8", coef="fp32"),
                   dict(DROPOUT=True, INPUT_PRECISION=prec, BLOCK_M=64, BLOCK_K=64, BLOCK_R=block_r,
                        stride_xk=1, stride_ak=1, stride_or=1),
                   ("x_ptr", "a_ptr", "out_ptr", "bits_ptr", "K", "stride_xm", "stride_ar", "stride_om", "stride_bm"),
                   num_warps=4)
    elif which == "dA":
        k = _build(kl._lora_dA_kernel, dict(g_ptr=t, x_ptr=t, out_ptr="*fp32", bits_ptr="*u8"),
                   dict(INPUT_PRECISION=prec, BLOCK_M=64, BLOCK_K=64, BLOCK_R=block_r, stride_gr=1, stride_xk=1),
                   ("g_ptr", "x_ptr", "out_ptr", "bits_ptr", "K", "stride_gm", "stride_xm", "stride_os", "stride_or",
                    "stride_bm"), num_warps=4)
    elif which == "g_db":
        import torch

        bm, bn, warps = kl.g_db_tile({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype],
                                     block_r)
        k = _build(kl._lora_g_db_kernel, dict(dy_ptr=t, b_ptr=t, xa_ptr=t, g_ptr=t, db_ptr="*fp32"),
                   dict(INPUT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, stride_dyn=1, stride_xr=1,
                        stride_gr=1, stride_dbr=1),
                   ("dy_ptr", "b_ptr", "xa_ptr", "g_ptr", "db_ptr", "N", "stride_dym", "stride_bn", "stride_xm",
                    "stride_gm", "stride_dbn"), num_warps=warps)
    elif which == "mask":
        k = _build(kl._draw_bits_kernel, dict(bits_ptr="*u8", seed_ptr="*i64", p="fp32"),
                   dict(BLOCK_M=32, BLOCK_B=16), ("bits_ptr", "K", "stride_bm"), num_warps=4)
    else:  # grouped CE at C = 4096 (one-hot group sums) and backward
        bn, bc, bg, one_hot, warps = kg.tiles(4096, 4)
        ptrs = dict(logits_ptr=t, labels_ptr="*i64", groups_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32",
                    group_sum_ptr="*fp32", group_count_ptr="*fp32", flags_ptr="*i64", grad_loss_ptr="*fp32",
                    grad_sum_ptr="*fp32", dlogits_ptr=t, smoothing="fp32")
        fn = kg.grouped_ce_fwd_kernel if which == "ce_fwd" else kg.grouped_ce_bwd_kernel
        consts = (dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_G=bg, ONE_HOT_GROUPS=one_hot, SMOOTH=True)
                  if which == "ce_fwd" else dict(BLOCK_N=bn, BLOCK_C=bc, HAS_GRAD_LOSS=True, HAS_GRAD_SUM=True,
                                                  SMOOTH=True))
        k = _build(fn, {n: v for n, v in ptrs.items() if n in fn.arg_names}, consts,
                   (*ptrs, "stride_row", "n_cols"), num_warps=warps)
    return dict(kernel=which, case=name, **_resources(k))


def cases(full: bool) -> list[tuple]:
    """(function, args) per variant. Default: five launch kinds at a tile that can be chosen, and the
    small kernels in bf16; full: every tile × kind, fp16/fp32 at the fallback tile, three dtypes."""
    from fastfair.kernels.lora_tiles import GEMM_TILES

    fixed = (128, 128, 32, 4, 3)
    out = []
    if full:
        for tile in GEMM_TILES:
            for fs in GEMM_FLAGS:
                for br in ((16, 64) if "inloop" in fs else (16,)):
                    out.append((_gemm_case, (f"{fs}/bf16/{tile}/R{br}", fs, "bf16", tile, br)))
        for dt in ("fp16", "fp32"):
            for fs in GEMM_FLAGS:
                out.append((_gemm_case, (f"{fs}/{dt}/{fixed}/R16", fs, dt, fixed if dt != "fp32" else
                                         (128, 128, 32, 4, 2), 16)))
    else:  # each launch kind at the first tile the autotuner may choose for it
        from fastfair.kernels.lora import choosable_tiles
        from fastfair.kernels.lora_tiles import launch_kind

        for fs, br in (("fwd", 16), ("fwd_inloop", 64), ("dx_masked", 16), ("dx_inloop_db_masked", 16),
                       ("fwd_int8", 16)):
            tile = choosable_tiles(launch_kind(GEMM_FLAGS[fs]))[0]
            out.append((_gemm_case, (f"{fs}/bf16/{tile}/R{br}", fs, "bf16", tile, br)))
    for which in ("down", "dA", "g_db", "mask", "ce_fwd", "ce_bwd"):
        for dt in (("bf16", "fp16", "fp32") if full else ("bf16",)):
            for br in ((16, 64) if full and which in ("down", "dA", "g_db") else (16,)):
                out.append((_small_case, (f"{which}/{dt}/R{br}", which, dt, br)))
    return out


def _run(job):
    fn, args = job
    return fn(*args)


def main(argv: list[str]) -> None:
    jobs = cases("--full" in argv)
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for rec in pool.map(_run, jobs):
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

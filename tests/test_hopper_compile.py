"""The kernels that ship, compiled for sm_90 with real specialization: no spills where they can be chosen.

Default run: a representative subset (five GEMM launch kinds, each at a tile the autotuner may
choose, the down-projection, dA, the mask and grouped CE kernels; about 40 s on 2 cores).
``FASTFAIR_FULL_TESTS=1`` adds the full sweep (about 20 minutes on 2 busy cores): every autotune
tile × launch kind (BLOCK_R 16 and 64 where the rank enters the tile), fp16/fp32 at the fixed
tile, each small kernel in three dtypes.
"""
import json
import os
import subprocess
import sys

import pytest

from fastfair.kernels import lora as kl
from fastfair.kernels.lora_tiles import GEMM_TILES

HERE = os.path.dirname(__file__)


def compile_records(full: bool) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "hopper_compile.py"), *(["--full"] if full else [])],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in recs:  # the record the issue asks for: registers, spills, shared memory
        print(f"{r['case']:<48} regs {r['regs']:>3}  stack {r['stack']:>5}  local {r['local']:>4}  "
              f"smem {r['shared']:>6}  cp.async {r['cp_async']}")
    return recs


def choosable(rec: dict) -> bool:
    """Whether the autotuner (after ``kl.prune_spilling``) may pick this GEMM variant."""
    if rec["kernel"] != "lora_gemm" or tuple(rec["tile"]) not in GEMM_TILES:
        return True  # small kernels have one config; fp16/fp32 rows use the fixed fallback tile
    return tuple(rec["tile"]) in kl.choosable_tiles(rec["kind"])


def check(recs: list[dict]) -> None:
    assert recs, "nothing compiled"
    spills = [r["case"] for r in recs if choosable(r) and (r["stack"] or r["local"])]
    assert not spills, f"choosable configs spill: {spills}"
    # The LoRA-only accumulate ("nobase") has no K loop to pipeline: its loads are rank-sized.
    scalar = [r["case"] for r in recs if r["kernel"] in ("lora_gemm", "down", "dA", "g_db") and not r["cp_async"]
              and not r.get("kind", "").startswith("nobase")]
    assert not scalar, f"no cp.async (alignment specialization lost?): {scalar}"
    assert all(r["shared"] <= 227 * 1024 for r in recs)  # sm_90's per-block limit


def test_representative_kernels_compile_without_spills():
    check(compile_records(full=False))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTFAIR_FULL_TESTS") != "1", reason="full sweep: FASTFAIR_FULL_TESTS=1")
def test_full_sweep_compiles_without_choosable_spills():
    recs = compile_records(full=True)
    check(recs)
    # every shipped tile was compiled for every launch kind
    gemm = {r["case"].split("/")[2] for r in recs if r["kernel"] == "lora_gemm"}
    assert {str(t) for t in GEMM_TILES} <= gemm


@pytest.mark.parametrize("flags, n_tiles", [
    (dict(MASKED=True), len(GEMM_TILES) - 4), (dict(MASKED=True, DOWN=True, DB=True, BLOCK_R=64), len(GEMM_TILES) - 5),
    (dict(HAS_BASE=False, MASKED=True), len(GEMM_TILES) - 4), (dict(DOWN=True, BLOCK_R=64), len(GEMM_TILES) - 3),
    (dict(DOWN=True, BLOCK_R=16), len(GEMM_TILES)), (dict(COL_SCALE=True), len(GEMM_TILES)),
])
def test_autotuner_is_never_offered_a_spilling_tile(flags, n_tiles):
    from fastfair.kernels.lora_tiles import launch_kind, spilling

    kept = kl.prune_spilling(kl._gemm_configs(), {}, **flags)
    assert len(kept) == n_tiles
    assert not {kl._tile(c) for c in kept} & spilling(launch_kind(flags))

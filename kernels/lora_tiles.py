"""Tile shapes of the LoRA kernels and the cost-model constants that describe them.

Plain numbers, no Triton import: the design chooser (``fastfair.ops.lora_design``) reads the cost
constants as its prior on machines without Triton, and ``kernels.lora`` builds its autotune
configurations from the same tile list, so a change of tiles and of the prior they imply is made
in one place.
"""

# Hopper candidates for the fused GEMM: BLOCK_M, BLOCK_N, BLOCK_K, warps, stages.
GEMM_TILES = (
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 32, 4, 4),
    # Small 8-warp tiles: the fewest registers per thread, for launches that are short of them.
    (64, 64, 32, 8, 3), (64, 64, 64, 8, 3),
)
# The in-loop down-projection keeps an fp32 [BLOCK_M, R] accumulator beside the output tile's.
DOWN_MAX_RANK = 64
MAX_RANK = 256
# lora_g_db keeps g's fp32 [BLOCK_M, R] accumulator and xa's tile in registers.
G_DB_MAX_RANK = 64

# Cost-model prior (docs/kernels/lora.md §4), H100 SXM figures: PREDICTED, never measured here.
# Used only when the chooser does not time (deterministic mode, FASTFAIR_AUTOTUNE=0, no GPU).
GEMM_FLOPS = 650e12  # cuBLAS bf16 at ViT training shapes (about two thirds of the dense peak)
HBM_BYTES = 3.35e12
TRITON_EFF = 0.75  # fused Triton GEMM speed ÷ cuBLAS (review's estimate 0.65-0.8, non-persistent)
TILE_N = 128  # output columns per block: the in-loop down-projection is recomputed once per block
INLOOP_EXTRA = 0.25  # the in-loop N = R wgmma per k-step costs 15-30% (review), not R / TILE_N
INT8_INLOOP_SLOWDOWN = 2.5  # int8 tiles converted in registers leave wgmma's async path (247 vs 611 TFLOP/s reported)

# Launch kinds of the fused GEMM whose register use depends on the flags (the masked loop's Philox
# draws, the in-loop accumulator, the atomic dB): the kind names a launch by the flags that matter.
KIND_FLAGS = ("MASKED", "DOWN", "DB", "COL_SCALE", "ROW_SCALE")


def launch_kind(flags: dict) -> str:
    """E.g. ``"MASKED+DOWN+DB+R16"``; ``"nobase+..."`` for the LoRA-only accumulate launch. The
    in-loop accumulator's width (BLOCK_R) is part of it: R = 64 spills where R = 16 does not."""
    parts = [] if flags.get("HAS_BASE", True) else ["nobase"]
    parts += [f for f in KIND_FLAGS if flags.get(f)]
    if flags.get("DOWN"):
        parts.append(f"R{flags.get('BLOCK_R', 16)}")
    return "+".join(parts) or "plain"


# Register spills on sm_90, measured by tests/hopper_compile.py (Triton 3.8, bf16, ViT-B strides):
# the autotuner never tries a tile listed as spilling for a launch's kind.
# * Masked launches (dropout: each adapter's keep bits unpacked in the epilogue, then a masked
#   rank-R product) spill 296-768 B per thread at these four tiles, in every masked kind (dX, dX with
#   the in-loop g and atomic dB, int8 dX, the LoRA-only accumulate). When the epilogue still drew
#   Philox per element, every tile but the two small 8-warp ones spilled (24 B - 8 KB).
MASKED_SPILLS = frozenset({(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4)})
# * The in-loop down-projection at BLOCK_R = 64 (forward, and dX with the atomic dB) spills at these;
#   masked as well, it also spills at 128×64 with 4 warps (8 B).
DOWN_WIDE_SPILLS = frozenset({(256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4)})
MASKED_DOWN_WIDE_SPILLS = MASKED_SPILLS | DOWN_WIDE_SPILLS | {(128, 64, 64, 4, 4)}


def spilling(kind: str) -> frozenset:
    """The tiles measured (or, for unswept flag combinations, ruled) to spill for ``kind``."""
    wide = "DOWN" in kind and "R16" not in kind  # BLOCK_R 32 is unswept: ruled like 64
    if "MASKED" in kind:
        return MASKED_DOWN_WIDE_SPILLS if wide else MASKED_SPILLS
    return DOWN_WIDE_SPILLS if wide else frozenset()

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
)
# The in-loop down-projection keeps an fp32 [BLOCK_M, R] accumulator beside the output tile's.
DOWN_MAX_RANK = 64
MAX_RANK = 256

# Cost-model prior (docs/kernels/lora.md §4), H100 SXM figures: PREDICTED, never measured here.
# Used only when the chooser does not time (deterministic mode, FASTFAIR_AUTOTUNE=0, no GPU).
GEMM_FLOPS = 650e12  # cuBLAS bf16 at ViT training shapes (about two thirds of the dense peak)
HBM_BYTES = 3.35e12
TRITON_EFF = 0.75  # fused Triton GEMM speed ÷ cuBLAS (review's estimate 0.65-0.8, non-persistent)
TILE_N = 128  # output columns per block: the in-loop down-projection is recomputed once per block
INLOOP_EXTRA = 0.25  # the in-loop N = R wgmma per k-step costs 15-30% (review), not R / TILE_N

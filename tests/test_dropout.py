"""Dropout masks: keep rate, independence between adapters, layers and steps, and bit packing.

Statistical bounds are 5 standard errors: a correct generator fails one of these tests about
once in 1.7 million runs; a mask reused across adapters or steps (correlation 1) fails always.
"""
import math

import pytest
import torch

from fastfair.kernels.lora import dropout_mask
from fastfair.ops.lora import draw_masks, pack_bits, unpack_bits

M, K = 1000, 1000  # 10⁶ draws per mask


def keep_rate_ok(keep: torch.Tensor, p: float) -> None:
    n = keep.numel()
    se = math.sqrt(p * (1 - p) / n)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) <= 5 * se, f"keep rate {rate} vs {1 - p} ± 5·{se}"


def uncorrelated(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.double().flatten(), b.double().flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) <= 5 / math.sqrt(a.numel()), f"correlation {r}"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_torch_masks_keep_rate_and_adapters_independent(p):
    masks = draw_masks(torch.tensor([987654321]), M, K, [p, p])
    keep = unpack_bits(masks, K)
    keep_rate_ok(keep[0], p)
    keep_rate_ok(keep[1], p)
    uncorrelated(keep[0], keep[1])
    # Neighbouring elements too: a generator reused with a shifted offset would correlate them.
    uncorrelated(keep[0][:, :-1], keep[0][:, 1:])


def test_torch_masks_differ_between_calls():
    # Each call (a layer, or the same layer at the next step) draws its own seed from the global
    # generator, as the dispatcher does.
    seeds = [torch.randint(0, 2**62, (1,), dtype=torch.int64) for _ in range(2)]
    a, b = (unpack_bits(draw_masks(s, M, K, [0.3]), K)[0] for s in seeds)
    uncorrelated(a, b)
    same = draw_masks(seeds[0], M, K, [0.3])
    assert torch.equal(unpack_bits(same, K)[0], a)  # a function of the seed: backward can trust it


def test_kernel_masks_keep_rate_and_independence():
    # The Triton draw (interpreter): adapters 2⁴⁰ apart on one Philox stream, and fresh seeds.
    p = 0.1
    m0 = dropout_mask(11, M, K, p, 0, "cpu")
    keep_rate_ok(m0, p)
    uncorrelated(m0, dropout_mask(11, M, K, p, 1, "cpu"))
    uncorrelated(m0, dropout_mask(12, M, K, p, 0, "cpu"))


@pytest.mark.parametrize("K_", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_round_trip_and_size(K_):
    keep = torch.rand(3, 5, K_) < 0.5
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (K_ + 7) // 8)
    assert torch.equal(unpack_bits(packed, K_), keep)

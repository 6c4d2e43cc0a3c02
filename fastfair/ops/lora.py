"""LoRA linear op: the plain-PyTorch reference (ground truth and CPU path) and the dispatcher.

``y = x Wᵀ + b + Σ_a s_a · (drop_a(x) A_aᵀ) B_aᵀ`` over the active adapters ``a``.
The frozen base weight ``W`` is either a dense tensor or an :class:`Int8Weight` (bitsandbytes'
row-wise int8 storage); in both paths the activations stay in their own dtype (weight-only int8).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..backend import nvtx_range, resolve_backend
from ..int8 import Int8Weight, dense_weight


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
    """Dispatch to the fused Triton op or the reference, by ``backend`` and ``x.device``."""
    if resolve_backend(backend, x.device) == "triton":
        from .lora_triton import lora_linear_triton

        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
            # torch does not autocast a custom Function: cast x as it would for F.linear, or a
            # bf16 mixed-precision run does its LoRA layers' GEMMs in float32
            x = x.to(torch.get_autocast_dtype(dev))
            with torch.autocast(dev, enabled=False):
                return lora_linear_triton(x, weight, bias, lora_A, lora_B, scales, dropout, training)
        return lora_linear_triton(x, weight, bias, lora_A, lora_B, scales, dropout, training)
    with nvtx_range("fastfair.lora_linear.reference"):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scales, dropout, training)

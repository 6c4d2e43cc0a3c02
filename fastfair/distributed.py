"""Autograd-aware all-reduce for statistics that must be global under data parallelism.

Convention (the one DDP and accelerate assume): every rank computes the same global loss
``ℓ(Σ_r s_r)`` of per-rank statistics ``s_r``, and DDP *averages* parameter gradients over the
``W`` ranks. The backward of the sum is again an all-reduce sum, so rank ``r`` receives
``Σ_r' ∂ℓ/∂y = W · ∂ℓ/∂y`` for its own ``s_r``: its gradient is ``W ×`` its share of the global
gradient, and DDP's average ``(1/W) Σ_r W · share_r`` is exactly the single-process gradient of
the global batch. Without DDP's averaging (summing gradients by hand) divide by ``W``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group``, differentiable (see the module docstring).

    Returns ``tensor`` itself when torch.distributed is not initialized or has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)

"""Weight-only int8: bitsandbytes' row-wise int8 storage, read as ``W ≈ CB · SCB / 127``.

The one home of int8 in fastfair: the storage type the ops take, its dequantization, and the
bookkeeping bitsandbytes needs after a device move.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn


class Int8Weight(NamedTuple):
    """bitsandbytes ``Int8Params`` storage: ``W ≈ CB * SCB[:, None] / 127``."""

    CB: torch.Tensor  # [N, K] int8
    SCB: torch.Tensor  # [N] float32 absmax per output row

    @property
    def shape(self):
        return self.CB.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.CB.float() * (self.SCB.float() / 127.0).unsqueeze(1)).to(dtype)


def dense_weight(weight: torch.Tensor | Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, Int8Weight):
        return weight.dequantize(dtype)
    return weight.to(dtype)


def is_int8_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:
        return False
    return isinstance(module, bnb.nn.Linear8bitLt)


def sync_int8_storage(base: nn.Module) -> None:
    """Point CB/SCB at the int8 weight's current storage and device after a move.

    ``Module.to``/``cuda`` replace ``weight.data`` in place and leave the ``CB``/``SCB``
    attributes (and ``state``'s copies) on the old device: a backbone quantized on the CPU and
    then moved to the GPU would read CPU tensors.
    """
    w = base.weight
    if w.dtype != torch.int8:
        return
    state = base.state
    for owner in (w, state):
        cb = getattr(owner, "CB", None)
        if cb is not None and (cb.device != w.device or cb.data_ptr() != w.data_ptr()):
            owner.CB = w.data
    for owner in (w, state):
        scb = getattr(owner, "SCB", None)
        if scb is not None and scb.device != w.device:
            owner.SCB = scb.to(w.device)

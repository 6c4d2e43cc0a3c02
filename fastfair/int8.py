"""Weight-only int8: bitsandbytes' row-wise int8 storage, read as ``W ≈ CB · SCB / 127``.

The one home of int8 in fastfair. :class:`Int8Linear` owns its int8 rows and scales as buffers
(gpt-fast's ``WeightOnlyInt8Linear`` shape), so device moves need no bookkeeping; it is built
from an ``nn.Linear`` (quantized by bitsandbytes' own ``int8_vectorwise_quant``) or from a
bitsandbytes ``Linear8bitLt`` (its ``CB``/``SCB`` taken over as they are). Its forward
dequantizes and runs the 16/32-bit GEMM: weight-only, unlike LLM.int8, which also quantizes
the activations. :class:`Int8Weight` is the storage view the LoRA ops take.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Weight(NamedTuple):
    """bitsandbytes ``Int8Params`` storage: ``W ≈ CB * SCB[:, None] / 127``."""

    CB: torch.Tensor  # [N, K] int8
    SCB: torch.Tensor  # [N] float absmax per output row

    @property
    def shape(self):
        return self.CB.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # float64 callers get float64 arithmetic; everything else is exact enough in float32
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.CB.to(work) * (self.SCB.to(work) / 127.0).unsqueeze(1)).to(dtype)


def dense_weight(weight: torch.Tensor | Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, Int8Weight):
        return weight.dequantize(dtype)
    return weight.to(dtype)


def check_float_input(x: torch.Tensor, layer: str) -> None:
    """Refuse integer and complex input as ``nn.Linear`` does, before any kernel runs."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{layer} expects a floating-point tensor, got {got}")


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 rows ``CB`` and per-row absmax ``SCB`` (buffers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("CB", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.ones(out_features, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        # an empty tensor of the layer's float dtype: follows model.to(dtype) like a weight would,
        # so ``weight`` dequantizes to what the rest of the model computes in
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        import bitsandbytes.functional as bnbF

        w = linear.weight.detach()
        # quantized in float32 on the CPU (bnb's device path rounds through float16 first)
        CB, SCB, _ = bnbF.int8_vectorwise_quant(w.float().cpu())
        return cls._from_storage(CB, SCB, linear.bias, w.device, w.dtype)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "Int8Linear":
        """Take over a bitsandbytes ``Linear8bitLt``'s int8 storage without requantizing."""
        w = layer.weight
        if w.dtype != torch.int8:  # has_fp16_weights or not moved yet: quantize its float weight
            return cls.from_linear(layer)
        # bitsandbytes' own forward moves CB/SCB from the weight to ``layer.state``
        SCB = getattr(w, "SCB", None)
        SCB = layer.state.SCB if SCB is None else SCB
        if SCB is None:
            raise ValueError("the Linear8bitLt has int8 data but no SCB scales; it cannot be read")
        dtype = layer.bias.dtype if layer.bias is not None else torch.float32
        return cls._from_storage(w.data, SCB, layer.bias, w.device, dtype)

    @classmethod
    def _from_storage(cls, CB, SCB, bias, device, dtype) -> "Int8Linear":
        out_features, in_features = CB.shape
        q = cls(in_features, out_features, bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            q.CB.copy_(CB)
            q.SCB.copy_(SCB.float())
            if bias is not None:
                q.bias.copy_(bias.detach())
        return q

    def storage(self) -> Int8Weight:
        return Int8Weight(self.CB, self.SCB)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``layer.weight`` (timm's EVA, BEiT)."""
        return self.storage().dequantize(self.dtype_ref.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A frozen dense ``nn.Linear`` with the dequantized weight (in the layer's dtype by default)."""
        dtype = dtype or self.dtype_ref.dtype
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.CB.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(self.storage().dequantize(dtype))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input(x, "Int8Linear")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.storage().dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _bnb_linear8bit():
    try:
        import bitsandbytes as bnb
    except Exception:
        return None
    return bnb.nn.Linear8bitLt


def is_int8_linear(module: nn.Module) -> bool:
    bnb_cls = _bnb_linear8bit()
    return isinstance(module, Int8Linear) or (bnb_cls is not None and isinstance(module, bnb_cls))


def to_int8_linear(module: nn.Module) -> Int8Linear:
    """A frozen :class:`Int8Linear` from an ``nn.Linear``, a bitsandbytes ``Linear8bitLt`` or itself."""
    if isinstance(module, Int8Linear):
        return module
    bnb_cls = _bnb_linear8bit()
    if bnb_cls is not None and isinstance(module, bnb_cls):
        return Int8Linear.from_bnb(module)
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module)
    raise ValueError(f"cannot store a {type(module).__name__} as int8: only nn.Linear layers")


def bnb_linear8bit(linear: nn.Linear) -> nn.Module:
    """A frozen bitsandbytes ``Linear8bitLt`` (LLM.int8 forward) holding ``linear``'s weight.

    For comparisons with bitsandbytes + peft; fastfair itself stores int8 as :class:`Int8Linear`.
    """
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=0.0)
    # bitsandbytes quantizes when Int8Params moves off the CPU copy it was built from
    q.weight = bnb.nn.Int8Params(linear.weight.detach().float().cpu(), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone().cpu(), requires_grad=False)
    return q.to(linear.weight.device).requires_grad_(False)


def int8_weight_bytes(module: nn.Module) -> int:
    """Bytes of an int8 layer's storage: one byte per weight plus its per-row scales."""
    if isinstance(module, Int8Linear):
        return module.CB.numel() + module.SCB.numel() * module.SCB.element_size()
    return module.weight.numel() + module.out_features * 4  # bitsandbytes keeps float32 SCB

"""``LoRAConv2d``: HF peft's convolution LoRA on an ``nn.Conv2d`` (reference path only).

As peft: ``A`` is a convolution with the base's kernel, stride and padding (``r`` output
channels) and ``B`` a 1×1 convolution back to the base's channels, so
``y = base(x) + scale · B(A(dropout(x)))``; the adapters are stored with peft's shapes
(``A``: r×in×kh×kw, ``B``: out×r×1×1) and save/load in peft's format. The patch embedding of a
timm ViT (``patch_embed.proj``) is such a layer, and peft wraps it whenever ``proj`` is a target.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .int8 import check_float_input
from .lora import LoRALayer

# the base's own convolution settings, read through the wrapper by code that inspects the layer
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
               "padding_mode")


class LoRAConv2d(LoRALayer):
    """LoRA beside a frozen ``nn.Conv2d`` (groups=1, dilation=1, zero padding, as peft supports)."""

    def __init__(self, base: nn.Conv2d, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str = "auto", adapter_name: str = "default"):
        super().__init__()
        self.check_base(base)
        # ``backend`` is kept for the common signature: convolutions always run the reference
        self._init_lora(base, backend)
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora=use_rslora)

    @staticmethod
    def check_base(base: nn.Module) -> None:
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        # peft's A keeps kernel, stride and padding but not dilation or groups; refuse what it
        # would compute differently instead of adapting a different function
        if base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros":
            raise ValueError(f"LoRA on a Conv2d needs groups=1, dilation=1 and zero padding, got "
                             f"groups={base.groups}, dilation={base.dilation}, padding_mode={base.padding_mode!r}")

    @staticmethod
    def adapter_shapes(base, r):
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)

    def __getattr__(self, name: str):
        if name in _CONV_ATTRS:
            return getattr(self.base, name)
        return super().__getattr__(name)

    def dense_base_weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale · B ∘ A`` as one kernel (out×in×kh×kw): B is 1×1, so the composition is exact."""
        dt = self._delta_dtype(name)
        B = self.lora_B[name].to(dt)[:, :, 0, 0]
        return self.adapters[name].scale * torch.einsum("or,rikl->oikl", B, self.lora_A[name].to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input(x, "LoRAConv2d")
        y = self.base(x)
        conv = dict(stride=self.base.stride, padding=self.base.padding)
        for n in self._active_unmerged():
            cfg = self.adapters[n]
            xd = F.dropout(x, cfg.dropout, self.training) if cfg.dropout > 0 else x
            h = F.conv2d(xd, self.lora_A[n].to(x.dtype), None, **conv)
            y = y + cfg.scale * F.conv2d(h, self.lora_B[n].to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return (f"in={self.base.in_channels}, out={self.base.out_channels}, kernel={self.base.kernel_size}, "
                f"{super().extra_repr()}")

"""``LoRALinear``: a drop-in LoRA wrapper for ``nn.Linear`` and bitsandbytes ``Linear8bitLt``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .backend import check_backend
from .int8 import Int8Weight, is_int8_linear, sync_int8_storage
from .ops.lora import lora_linear


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    alpha: float
    dropout: float
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_adapter_args(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got r={r!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got alpha={alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")


class LoRALinear(nn.Module):
    """``y = base(x) + Σ_a scale_a · dropout_a(x) A_aᵀ B_aᵀ`` over the active adapters.

    ``base`` is an ``nn.Linear`` or a bitsandbytes ``Linear8bitLt``; its weight and bias are
    frozen. Each adapter ``a`` has ``lora_A[a]`` (r×in, Kaiming-uniform like HF peft) and
    ``lora_B[a]`` (out×r, zeros), so a fresh layer computes exactly its base. Adapters are float32
    unless the base is float64; they run in the input's dtype.
    ``scale = alpha / r``, or ``alpha / √r`` with ``use_rslora``.

    Several adapters may live in one layer (``add_adapter``); the active ones (``set_active``) are
    summed, and each can be frozen (``set_trainable``): PEFTDebias keeps a frozen upstream
    debiasing adapter beside a trainable task adapter.

    An 8-bit base is used weight-only: its int8 rows are dequantized and the activations keep
    their dtype, which is more accurate than LLM.int8's int8 activations.

    ``backend``: ``"torch"`` (the plain-PyTorch reference), ``"triton"`` (fused kernels) or
    ``"auto"`` (Triton for CUDA inputs, the reference otherwise).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
        adapter_name: str = "default",
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"LoRALinear wraps an nn.Linear or bitsandbytes Linear8bitLt, got {type(base).__name__}"
            )
        self.base = base
        self.backend = check_backend(backend)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapters: dict[str, AdapterConfig] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora=use_rslora)

    # -- shape and weights -------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def is_int8(self) -> bool:
        return is_int8_linear(self.base)

    def base_weight(self) -> torch.Tensor | Int8Weight:
        w = self.base.weight
        if self.is_int8:
            # bitsandbytes' own forward moves CB/SCB from the weight to ``base.state``
            CB = w.CB if getattr(w, "CB", None) is not None else self.base.state.CB
            SCB = w.SCB if getattr(w, "SCB", None) is not None else self.base.state.SCB
            if CB is None or SCB is None:
                raise ValueError(
                    "the Linear8bitLt base is not quantized yet (its weight has no CB); "
                    "move it to a device first or build it with fastfair.quantize_backbone"
                )
            return Int8Weight(CB, SCB)
        return w

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.is_int8:
            sync_int8_storage(self.base)
        return self

    # -- adapters ----------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        trainable: bool = True,
        use_rslora: bool = False,
        activate: bool = True,
    ) -> None:
        _check_adapter_args(r, alpha, dropout)
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer: {list(self.adapters)}")
        w = self.base.weight
        # float32 adapters on a half or int8 base, as peft does: AdamW steps of ~1e-4 are below
        # bf16's resolution at A's magnitude, so bf16 adapters would silently stop learning
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(r, self.in_features, dtype=dtype, device=w.device)
        # HF peft's default init: kaiming_uniform_(a=√5) on A, zeros on B.
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, r, dtype=dtype, device=w.device)
        self.lora_A[name] = nn.Parameter(A, requires_grad=trainable)
        self.lora_B[name] = nn.Parameter(B, requires_grad=trainable)
        self.adapters[name] = AdapterConfig(r, float(alpha), float(dropout), use_rslora)
        if activate:
            self.active.append(name)

    def _check_known(self, names) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.adapters)}")

    def set_trainable(self, name: str, flag: bool = True) -> None:
        self._check_known([name])
        self.lora_A[name].requires_grad_(flag)
        self.lora_B[name].requires_grad_(flag)

    def set_active(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self._check_known(names)
        if any(n not in names for n in self.merged):
            self.unmerge()  # a merged adapter sits in the base weight: take it out before it stops counting
        self.active = names

    def delete_adapter(self, name: str) -> None:
        self._check_known([name])
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge() before deleting it")
        del self.lora_A[name], self.lora_B[name], self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale · B A`` (out×in) of one adapter, in float32."""
        cfg = self.adapters[name]
        return cfg.scale * (self.lora_B[name].float() @ self.lora_A[name].float())

    # -- merging -----------------------------------------------------------------------------
    def merge(self, dequantize: bool = False) -> None:
        """Fold the active adapters into the base weight (for inference)."""
        todo = [n for n in self.active if n not in self.merged]
        if not todo:
            return
        if self.is_int8:
            if not dequantize:
                raise ValueError(
                    "cannot merge into an 8-bit base without losing the int8 storage; "
                    "call merge(dequantize=True) to replace the base by a dequantized nn.Linear"
                )
            self._dequantize_base()
        with torch.no_grad():
            w = self.base.weight
            delta = sum(self.delta_weight(n) for n in todo)
            w.copy_((w.float() + delta).to(w.dtype))
        self.merged.extend(todo)

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base.weight
            delta = sum(self.delta_weight(n) for n in self.merged)
            w.copy_((w.float() - delta).to(w.dtype))
        self.merged = []

    def _dequantize_base(self) -> None:
        old = self.base
        dense = self.base_weight().dequantize(torch.float32)
        new = nn.Linear(self.in_features, self.out_features, bias=old.bias is not None,
                        device=dense.device, dtype=torch.float32)
        with torch.no_grad():
            new.weight.copy_(dense)
            if old.bias is not None:
                new.bias.copy_(old.bias.float())
        new.requires_grad_(False)
        self.base = new

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear expects input with last dim in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        names = [n for n in self.active if n not in self.merged]
        cfgs = [self.adapters[n] for n in names]
        return lora_linear(
            x,
            self.base_weight(),
            self.base.bias,
            [self.lora_A[n] for n in names],
            [self.lora_B[n] for n in names],
            [c.scale for c in cfgs],
            [c.dropout for c in cfgs],
            training=self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={c.r}, alpha={c.alpha:g}, dropout={c.dropout:g})"
                        for n, c in self.adapters.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ads}], active={self.active}"

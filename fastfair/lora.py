"""``LoRALinear``: a drop-in LoRA wrapper for ``nn.Linear``, int8 linears and bitsandbytes ``Linear8bitLt``.

``LoRALayer`` holds what every LoRA wrapper shares (named adapters, activation, freezing,
merging, the effective ``weight``); ``LoRALinear`` adds the linear forward through
``fastfair.ops.lora`` and ``fastfair.lora_conv.LoRAConv2d`` the convolution.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .backend import check_backend
from .int8 import Int8Linear, Int8Weight, check_float_input, is_int8_linear, to_int8_linear
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


def check_adapter_args(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got r={r!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got alpha={alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other weight dtype is updated and merged in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoRALayer(nn.Module):
    """Named adapters ``A`` (``lora_A[name]``) and ``B`` (``lora_B[name]``) beside a frozen ``base``.

    Subclasses give the adapter shapes (``adapter_shapes``), the base's dense weight
    (``dense_base_weight``), ``scale · ΔW`` of one adapter (``delta_weight``) and the forward.
    Several adapters may live in one layer (``add_adapter``); the active ones (``set_active``) are
    summed, and each can be frozen (``set_trainable``): PEFTDebias keeps a frozen upstream
    debiasing adapter beside a trainable task adapter. ``A`` is Kaiming-uniform (a=√5) and ``B``
    zero, as HF peft, so a fresh layer computes exactly its base. Adapters are float32 unless the
    base is float64. ``scale = alpha / r``, or ``alpha / √r`` with ``use_rslora``.
    """

    def _init_lora(self, base: nn.Module, backend: str) -> None:
        self.base = base
        self.backend = check_backend(backend)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapters: dict[str, AdapterConfig] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._warned_weight_dropout = False

    # -- what subclasses provide -------------------------------------------------------------
    @staticmethod
    def adapter_shapes(base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def dense_base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _base_float(self) -> torch.Tensor:
        """A float tensor on the base's device whose dtype the adapters follow."""
        return self.base.weight

    # -- the effective weight ----------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """``W + Σ scale·ΔW`` over the active, unmerged adapters, differentiable in ``A`` and ``B``.

        For code that calls ``F.linear(x, layer.weight, ...)`` itself (timm's EVA, BEiT, SwinV2):
        the adapters train through it, but their dropout cannot apply there.
        """
        w = self.dense_base_weight()
        names = [n for n in self.active if n not in self.merged]
        if not names:
            return w
        if self.training and not self._warned_weight_dropout and any(self.adapters[n].dropout > 0 for n in names):
            self._warned_weight_dropout = True
            warnings.warn("a LoRA layer's .weight is read directly (F.linear on layer.weight): its adapter "
                          "dropout cannot apply on that path and is skipped", UserWarning, stacklevel=2)
        return w + sum(self.delta_weight(n) for n in names).to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    # -- adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    trainable: bool = True, use_rslora: bool = False, activate: bool = True) -> None:
        check_adapter_args(r, alpha, dropout)
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer: {list(self.adapters)}")
        ref = self._base_float()
        # float32 adapters on a half or int8 base, as peft does: AdamW steps of ~1e-4 are below
        # bf16's resolution at A's magnitude, so bf16 adapters would silently stop learning
        dtype = work_dtype(ref.dtype)
        shape_A, shape_B = self.adapter_shapes(self.base, r)
        A = torch.empty(shape_A, dtype=dtype, device=ref.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # HF peft's default init
        B = torch.zeros(shape_B, dtype=dtype, device=ref.device)
        self.lora_A[name] = nn.Parameter(A, requires_grad=trainable)
        self.lora_B[name] = nn.Parameter(B, requires_grad=trainable)
        self.adapters[name] = AdapterConfig(r, float(alpha), float(dropout), use_rslora)
        if activate:
            self.active.append(name)

    def set_config(self, name: str, alpha: float, dropout: float, use_rslora: bool) -> None:
        """Replace an adapter's alpha, dropout and rslora (its rank is fixed by its shapes)."""
        check_adapter_args(self.adapters[name].r, alpha, dropout)
        self.adapters[name] = AdapterConfig(self.adapters[name].r, float(alpha), float(dropout), use_rslora)

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

    def _delta_dtype(self, name: str) -> torch.dtype:
        return work_dtype(self.lora_A[name].dtype)

    # -- merging -----------------------------------------------------------------------------
    def merge(self, dequantize: bool = False) -> None:
        """Fold the active adapters into the base weight (for inference)."""
        todo = [n for n in self.active if n not in self.merged]
        if not todo:
            return
        if is_int8_linear(self.base):
            if not dequantize:
                raise ValueError(
                    "cannot merge into an 8-bit base without losing the int8 storage; "
                    "call merge(dequantize=True) to replace the base by a dequantized nn.Linear"
                )
            self.base = to_int8_linear(self.base).to_linear()
        self._fold(todo, +1)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        if self.merged:
            self._fold(self.merged, -1)
            self.merged = []

    def _fold(self, names, sign: int) -> None:
        with torch.no_grad():
            w = self.base.weight
            work = work_dtype(w.dtype)  # float64 stays float64: no round trip through float32
            delta = sum(self.delta_weight(n).to(work) for n in names)
            w.copy_((w.to(work) + sign * delta).to(w.dtype))

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={c.r}, alpha={c.alpha:g}, dropout={c.dropout:g})"
                        for n, c in self.adapters.items())
        return f"adapters=[{ads}], active={self.active}"

    def _active_unmerged(self) -> list[str]:
        return [n for n in self.active if n not in self.merged]


class LoRALinear(LoRALayer):
    """``y = base(x) + Σ_a scale_a · dropout_a(x) A_aᵀ B_aᵀ`` over the active adapters.

    ``base`` is an ``nn.Linear``, a fastfair ``Int8Linear`` or a bitsandbytes ``Linear8bitLt``
    (taken over as an ``Int8Linear``: same int8 rows and scales); its weight and bias are frozen.
    An 8-bit base is used weight-only: its int8 rows are dequantized and the activations keep
    their dtype, which is more accurate than LLM.int8's int8 activations.

    ``backend``: ``"torch"`` (the plain-PyTorch reference), ``"triton"`` (fused kernels) or
    ``"auto"`` (Triton for CUDA inputs, the reference otherwise).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str = "auto", adapter_name: str = "default"):
        super().__init__()
        self.check_base(base)
        self._init_lora(to_int8_linear(base) if is_int8_linear(base) else base, backend)
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora=use_rslora)

    @staticmethod
    def check_base(base: nn.Module) -> None:
        if not isinstance(base, (nn.Linear, Int8Linear)):
            raise ValueError(f"LoRALinear wraps an nn.Linear, Int8Linear or bitsandbytes Linear8bitLt, "
                             f"got {type(base).__name__}")

    @staticmethod
    def adapter_shapes(base, r):
        return (r, base.in_features), (base.out_features, r)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def is_int8(self) -> bool:
        return isinstance(self.base, Int8Linear)

    def _base_float(self) -> torch.Tensor:
        return self.base.dtype_ref if self.is_int8 else self.base.weight

    def base_weight(self) -> torch.Tensor | Int8Weight:
        """What the op takes: the dense weight, or the int8 storage of an int8 base."""
        return self.base.storage() if self.is_int8 else self.base.weight

    def dense_base_weight(self) -> torch.Tensor:
        return self.base.weight  # Int8Linear.weight dequantizes

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale · B A`` (out×in) of one adapter, in float32 (float64 for float64 adapters)."""
        dt = self._delta_dtype(name)
        return self.adapters[name].scale * (self.lora_B[name].to(dt) @ self.lora_A[name].to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input(x, "LoRALinear")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear expects input with last dim in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        names = self._active_unmerged()
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
        return f"in={self.in_features}, out={self.out_features}, {super().extra_repr()}"

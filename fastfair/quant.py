"""8-bit backbones: frozen ``nn.Linear`` layers stored as bitsandbytes int8 rows + per-row scales."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch.nn as nn

from .inject import name_matches
from .int8 import is_int8_linear, sync_int8_storage
from .lora import LoRALinear


@dataclass
class QuantizationSummary:
    layers: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def __str__(self) -> str:
        mb = 2**20
        return (f"int8 backbone: {len(self.layers)} linear layers, weight memory "
                f"{self.weight_bytes_before / mb:.2f} MiB -> {self.weight_bytes_after / mb:.2f} MiB")


def to_int8_linear(linear: nn.Linear) -> nn.Module:
    """A frozen bitsandbytes ``Linear8bitLt`` holding ``linear``'s weight as row-wise int8."""
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=0.0)
    # bitsandbytes quantizes when Int8Params moves off the CPU copy it was built from, so build
    # on the CPU and move: this also quantizes when the target device is the CPU itself.
    q.weight = bnb.nn.Int8Params(linear.weight.detach().float().cpu(), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone().cpu(), requires_grad=False)
    q = q.to(device)
    if getattr(q.weight, "CB", None) is None:
        raise RuntimeError(f"bitsandbytes did not quantize the layer on {device}")
    q.requires_grad_(False)
    # a later .to()/.cuda() leaves CB/SCB on the old device; re-point them before each forward
    q.register_forward_pre_hook(_sync_before_forward)
    return q


def _sync_before_forward(module, args):
    sync_int8_storage(module)


def quantize_backbone(model: nn.Module, bits: int = 8, skip: str | Iterable[str] = ("head",)
                      ) -> QuantizationSummary:
    """Replace every ``nn.Linear`` not matching ``skip`` (also LoRA bases) by int8 storage.

    The layers become frozen; use it before or after ``inject_lora``. Returns the layers converted
    and their weight memory before and after (int8 rows plus one float32 scale per row).
    """
    if bits != 8:
        raise ValueError(f"only bits=8 (bitsandbytes row-wise int8) is supported, got bits={bits!r}")
    summary = QuantizationSummary()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, child, target = module, "base", module.base
        elif type(module) is nn.Linear and not name.endswith(".base"):
            parent_name, _, child = name.rpartition(".")
            parent, target = (model.get_submodule(parent_name) if parent_name else model), module
        else:
            continue
        if (skip and name_matches(name, skip)) or is_int8_linear(target):
            continue
        summary.weight_bytes_before += target.weight.numel() * target.weight.element_size()
        q = to_int8_linear(target)
        summary.weight_bytes_after += q.weight.CB.numel() * 1 + q.weight.SCB.numel() * q.weight.SCB.element_size()
        setattr(parent, child, q)
        summary.layers.append(name)
    if not summary.layers:
        raise ValueError(f"quantize_backbone found no nn.Linear to convert (skip={skip!r})")
    return summary


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of the model's linear layers (int8 storage counted as such)."""
    total = 0
    for m in model.modules():
        if is_int8_linear(m):  # SCB sits in m.state once bitsandbytes' own forward has run
            scb = m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB
            total += m.weight.numel() + scb.numel() * scb.element_size()
        elif type(m) is nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
    return total

"""8-bit backbones: frozen linear layers stored as int8 rows + per-row scales (``fastfair.int8``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch.nn as nn

from .inject import internal_names, model_edit, resolve_classifier, under, warn_unmatched
from .int8 import Int8Linear, int8_weight_bytes, is_int8_linear, to_int8_linear  # noqa: F401 (re-exported)
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


def quantize_backbone(model: nn.Module, bits: int = 8, skip: str | Iterable[str] | None = None
                      ) -> QuantizationSummary:
    """Store every linear layer (LoRA bases included) outside ``skip`` as a frozen ``Int8Linear``.

    ``skip=None``: the classifier from timm's metadata (``("head",)`` for other models); a
    pattern names a whole subtree, so ``"head"`` also keeps ``head.fc`` float. bitsandbytes
    ``Linear8bitLt`` layers are taken over as they are, so they too run weight-only. Use it before
    or after ``inject_lora``. Returns the layers converted and their weight memory before and
    after (int8 rows plus one float32 scale per row). All layers are converted before any is
    swapped in, so an error leaves the model as it was.
    """
    if bits != 8:
        raise ValueError(f"only bits=8 (bitsandbytes row-wise int8) is supported, got bits={bits!r}")
    skip = resolve_classifier(model, skip, "skip")
    warn_unmatched(model, skip, "skip")
    inside = internal_names(model)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            name, module = name + ".base", module.base
        elif not name or name in inside or not isinstance(module, nn.Linear):
            continue
        if isinstance(module, Int8Linear) or (skip and under(name, skip)):
            continue
        found.append((name, module))
    if not found:
        raise ValueError(f"quantize_backbone found no float linear layer to convert (skip={skip!r})")
    summary = QuantizationSummary()
    converted = [(name, to_int8_linear(m)) for name, m in found]
    with model_edit(model) as edit:
        for (name, old), (_, q) in zip(found, converted):
            summary.weight_bytes_before += (int8_weight_bytes(old) if is_int8_linear(old)
                                            else old.weight.numel() * old.weight.element_size())
            summary.weight_bytes_after += int8_weight_bytes(q)
            edit.replace(name, q)
            summary.layers.append(name.removesuffix(".base"))
    return summary


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of the model's linear layers (int8 storage counted as such)."""
    total = 0
    for m in model.modules():
        if is_int8_linear(m):
            total += int8_weight_bytes(m)
        elif type(m) is nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
    return total

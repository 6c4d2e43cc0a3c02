"""Add LoRA to any model in place: ``inject_lora`` wraps matching linear layers in ``LoRALinear``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch.nn as nn

from .lora import LoRALinear

# timm ViT / DeiT / DINOv2 / CLIP-ViT (timm's port) all name their linear layers this way.
VIT_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class InjectionSummary:
    wrapped: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"LoRA on {len(self.wrapped)} layers; trainable params {self.trainable_params:,} "
                f"of {self.total_params:,} ({pct:.2f}%)")


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """A module name matches a regex (full match) when ``patterns`` is a string, else any suffix.

    Suffixes match whole name components: ``"proj"`` matches ``blocks.0.attn.proj`` but not
    ``blocks.0.attn.out_proj``.
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int8 weights count one parameter per element."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def inject_lora(
    model: nn.Module,
    targets: str | Iterable[str] = VIT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    exclude: str | Iterable[str] = (),
    trainable: str | Iterable[str] = ("head",),
    use_rslora: bool = False,
    backend: str = "auto",
    adapter_name: str = "default",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> InjectionSummary:
    """Wrap every linear layer whose name matches ``targets`` in ``LoRALinear``, in place.

    Every other parameter is frozen, adapters injected earlier included, except those of modules
    matching ``trainable`` (the classifier head by default). A layer that is already a ``LoRALinear`` gets a new adapter
    named ``adapter_name``, which is how a task adapter joins a frozen upstream one.
    ``rank_pattern`` / ``alpha_pattern`` map a module name (or suffix) to its own rank / alpha,
    as in HF peft. Works on any ``nn.Module``; names are those of ``model.named_modules()``.
    """
    rank_pattern = rank_pattern or {}
    alpha_pattern = alpha_pattern or {}
    summary = InjectionSummary()
    candidates = []
    wrapped_bases = {n + ".base" for n in lora_layers(model)}
    for name, module in model.named_modules():
        if not name or name in wrapped_bases:
            continue
        if not name_matches(name, targets) or (exclude and name_matches(name, exclude)):
            continue
        if isinstance(module, (nn.Linear, LoRALinear)):
            candidates.append((name, module))
    if not candidates:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no linear layer matches targets={targets!r} (exclude={exclude!r}); "
            f"linear layers in this model: {linear[:12]}{' ...' if len(linear) > 12 else ''}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in candidates:
        layer_r = pattern_value(rank_pattern, name, r)
        layer_alpha = pattern_value(alpha_pattern, name, alpha)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, layer_r, layer_alpha, dropout, use_rslora=use_rslora)
        else:
            parent_name, _, child = name.rpartition(".")
            parent = _get(model, parent_name)
            setattr(parent, child, LoRALinear(module, layer_r, layer_alpha, dropout, use_rslora,
                                              backend, adapter_name))
        summary.wrapped.append(name)
    for module in lora_layers(model).values():
        if adapter_name in module.adapters:
            module.set_trainable(adapter_name, True)
    if trainable:
        # a LoRA layer inside a trainable module keeps its base frozen and its adapters as set
        # above (a frozen upstream adapter stays frozen); int8 storage cannot train at all
        lora_params = {id(p) for m in lora_layers(model).values() for p in m.parameters()}
        for name, module in model.named_modules():
            if name and name_matches(name, trainable):
                for p in module.parameters():
                    if id(p) not in lora_params and p.is_floating_point():
                        p.requires_grad_(True)
    summary.trainable_params, summary.total_params = count_params(model)
    return summary


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def pattern_value(pattern: dict, name: str, default):
    """The value of the first key of a peft ``rank_pattern``/``alpha_pattern`` matching ``name``.

    As peft reads them: a key is a regex matched against the end of the name at a component
    boundary (``(.*\\.)?key``), so a plain name or suffix also works.
    """
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model

"""Add LoRA to any model in place: ``inject_lora`` wraps matching layers in ``LoRALinear``/``LoRAConv2d``.

Every call that changes a model (``inject_lora`` here, ``load_adapter``, ``quantize_backbone``)
checks everything first and then changes the model inside ``model_edit``, which puts the model
back exactly as it was should anything still fail: a failed call never leaves a model half-changed.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from .backend import check_backend
from .families import GENERIC_TARGETS, classifier_names, default_targets, looks_adaptable
from .int8 import Int8Linear
from .lora import LoRALayer, LoRALinear, check_adapter_args, check_adapter_name
from .lora_conv import LoRAConv2d

# kept for callers that name timm ViT's layers explicitly
VIT_TARGETS = GENERIC_TARGETS


@dataclass
class InjectionSummary:
    wrapped: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    # layers left without LoRA that look like attention/MLP projections (or matched a target
    # but are of a type LoRA cannot wrap): what a user may have meant to adapt
    missed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        text = (f"LoRA on {len(self.wrapped)} layers; trainable params {self.trainable_params:,} "
                f"of {self.total_params:,} ({pct:.2f}%)")
        if self.missed:
            text += f"; not adapted: {self.missed[:8]}{' ...' if len(self.missed) > 8 else ''}"
        return text


def check_patterns(patterns, what: str) -> None:
    """A regex string must compile and a list must hold strings; the error names the value."""
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as e:
            raise ValueError(f"{what}={patterns!r} is not a valid regular expression: {e}") from None
    elif not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{what} must be a regex string or a list of module names, got {patterns!r}")


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """A module name matches a regex (full match) when ``patterns`` is a string, else any suffix.

    Suffixes match whole name components: ``"proj"`` matches ``blocks.0.attn.proj`` but not
    ``blocks.0.attn.out_proj``.
    """
    if isinstance(patterns, str):
        check_patterns(patterns, "pattern")
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def under(name: str, patterns) -> bool:
    """``name`` or one of its ancestors matches: a pattern names a whole subtree (``head`` covers ``head.fc``)."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def resolve_classifier(model: nn.Module, patterns, what: str):
    """``None`` means the classifier from timm's metadata (``("head",)`` for other models)."""
    if patterns is None:
        names = classifier_names(model)
        return ("head",) if names is None else tuple(names)
    check_patterns(patterns, what)
    return patterns


def warn_unmatched(model: nn.Module, patterns, what: str) -> None:
    if patterns and not any(name_matches(n, patterns) for n, _ in model.named_modules() if n):
        warnings.warn(f"{what}={patterns!r} matches no module of {type(model).__name__}", UserWarning,
                      stacklevel=3)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int8 weights count one parameter per element."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.CB.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return trainable, total


def wrapper_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA class that wraps ``module`` (a LoRA layer gets one more adapter), or None."""
    if isinstance(module, LoRALayer):
        return type(module)
    if isinstance(module, (nn.Linear, Int8Linear)):  # bitsandbytes' Linear8bitLt is an nn.Linear
        return LoRALinear
    if type(module) is nn.Conv2d:  # subclasses (timm's Conv2dSame) pad in their own forward
        return LoRAConv2d
    return None


class ModelEdit:
    """Changes to a model that ``rollback`` undoes: module swaps, added adapters, copies, flags."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._undo: list = []

    def replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, child)
        self._undo.append(lambda: setattr(parent, child, old))
        setattr(parent, child, new)

    def add_adapter(self, layer: LoRALayer, name: str, *args, **kwargs) -> None:
        layer.add_adapter(name, *args, **kwargs)
        active = list(layer.active)
        self._undo.append(lambda: (layer.delete_adapter(name), setattr(layer, "active", active)))

    def set_config(self, layer: LoRALayer, name: str, **kwargs) -> None:
        old = layer.adapters[name]
        layer.set_config(name, **kwargs)
        self._undo.append(lambda: layer.adapters.__setitem__(name, old))

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        keep = dst.detach().clone()
        self._undo.append(lambda: dst.data.copy_(keep))
        with torch.no_grad():
            dst.copy_(src)

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        for p, flag in self._flags:
            p.requires_grad_(flag)


@contextmanager
def model_edit(model: nn.Module):
    edit = ModelEdit(model)
    try:
        yield edit
    except BaseException:
        edit.rollback()
        raise


def inject_lora(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    exclude: str | Iterable[str] = (),
    trainable: str | Iterable[str] | None = None,
    use_rslora: bool = False,
    backend: str = "auto",
    adapter_name: str = "default",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> InjectionSummary:
    """Wrap every ``nn.Linear``/int8 linear/``nn.Conv2d`` whose name matches ``targets`` in LoRA, in place.

    ``targets=None``: the attention and MLP projections of the model's timm family
    (``fastfair.families``; ``("qkv", "proj", "fc1", "fc2")`` for other models).
    Every other parameter is frozen, adapters injected earlier included, except those of modules
    matching ``trainable`` (``None``: the classifier from timm's metadata, ``("head",)`` for other
    models). A layer that already has LoRA gets a new adapter named ``adapter_name``, which is how
    a task adapter joins a frozen upstream one. ``rank_pattern`` / ``alpha_pattern`` map a module
    name (or suffix) to its own rank / alpha, as in HF peft. Names are those of
    ``model.named_modules()``; a string pattern is a regex matched against the whole name.
    """
    targets = default_targets(model) if targets is None else targets
    trainable = resolve_classifier(model, trainable, "trainable")
    for patterns, what in ((targets, "targets"), (exclude, "exclude")):
        check_patterns(patterns, what)
    check_adapter_name(adapter_name)
    check_backend(backend)
    plan, missed = _plan(model, targets, exclude, r, alpha, dropout, adapter_name,
                         rank_pattern or {}, alpha_pattern or {})
    warn_unmatched(model, trainable, "trainable")
    summary = InjectionSummary(missed=missed)
    with model_edit(model) as edit:
        model.requires_grad_(False)
        for name, module, layer_r, layer_alpha in plan:
            if isinstance(module, LoRALayer):
                edit.add_adapter(module, adapter_name, layer_r, layer_alpha, dropout, use_rslora=use_rslora)
            else:
                edit.replace(name, wrapper_for(module)(module, layer_r, layer_alpha, dropout, use_rslora,
                                                       backend, adapter_name))
            summary.wrapped.append(name)
        for layer in lora_layers(model).values():
            if adapter_name in layer.adapters:
                layer.set_trainable(adapter_name, True)
        set_trainable_modules(model, trainable)
    summary.trainable_params, summary.total_params = count_params(model)
    return summary


def _plan(model, targets, exclude, r, alpha, dropout, adapter_name, rank_pattern, alpha_pattern):
    """Every layer to wrap with its rank and alpha, all checked; and the layers missed."""
    for pattern, what in ((rank_pattern, "rank_pattern"), (alpha_pattern, "alpha_pattern")):
        check_patterns(list(pattern), what)
        for key in pattern:
            check_patterns(key, f"{what} key")
    inside = internal_names(model)
    plan, missed = [], []
    for name, module in model.named_modules():
        if not name or name in inside:
            continue
        wanted = name_matches(name, targets) and not (exclude and name_matches(name, exclude))
        cls = wrapper_for(module)
        if not wanted:
            if cls is not None and not isinstance(module, LoRALayer) and looks_adaptable(name, module):
                missed.append(name)
            continue
        if cls is None:
            missed.append(name)
            continue
        layer_r, layer_alpha = pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha)
        try:
            check_adapter_args(layer_r, layer_alpha, dropout)
            if isinstance(module, LoRALayer) and adapter_name in module.adapters:
                raise ValueError(f"already has an adapter named {adapter_name!r}: {list(module.adapters)}")
            if cls is LoRAConv2d and not isinstance(module, LoRALayer):
                LoRAConv2d.check_base(module)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        plan.append((name, module, layer_r, layer_alpha))
    if not plan:
        layers = [n for n, m in model.named_modules() if n not in inside and wrapper_for(m) is not None]
        raise ValueError(
            f"no Linear/Conv2d layer matches targets={targets!r} (exclude={exclude!r}); "
            f"such layers in this model: {layers[:12]}{' ...' if len(layers) > 12 else ''}"
        )
    classifier = classifier_names(model) or ()
    return plan, [n for n in missed if not (classifier and under(n, classifier))]


def internal_names(model: nn.Module) -> set[str]:
    """Names inside LoRA layers (their base and adapter containers): not the user's layers."""
    layers = list(lora_layers(model))
    return {n for n, _ in model.named_modules() if any(n.startswith(l + ".") for l in layers)}


def set_trainable_modules(model: nn.Module, trainable) -> None:
    """Unfreeze the modules matching ``trainable``, except LoRA layers' bases and adapters.

    A LoRA layer inside a trainable module keeps its base frozen and its adapters as they are
    (a frozen upstream adapter stays frozen); int8 storage cannot train at all.
    """
    if not trainable:
        return
    lora_params = {id(p) for m in lora_layers(model).values() for p in m.parameters()}
    for name, module in model.named_modules():
        if name and name_matches(name, trainable):
            for p in module.parameters():
                if id(p) not in lora_params and p.is_floating_point():
                    p.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def pattern_value(pattern: dict, name: str, default):
    """The value of the first key of a peft ``rank_pattern``/``alpha_pattern`` matching ``name``.

    As peft reads them: a key is a regex matched against the end of the name at a component
    boundary (``(.*\\.)?key``), so a plain name or suffix also works.
    """
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default

"""What to adapt and what to train, per timm family.

A timm model's family is the timm module that defines it (``timm.models.eva`` → ``"eva"``).
``FAMILIES`` maps it to the names of its attention and MLP projections (whole-component suffixes,
as ``inject_lora`` matches them); the classifier comes from timm's own metadata
(``pretrained_cfg["classifier"]`` and ``get_classifier()``), so it needs no table.
docs/families.md lists the table and what the zoo test verifies of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

ATTN = ("attn.qkv", "attn.proj")
MLP = ("mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class Family:
    models: str  # the architectures it covers, for messages and docs
    targets: tuple[str, ...]
    refuse: str = ""  # why default LoRA targets make no sense here


FAMILIES: dict[str, Family] = {
    "vision_transformer": Family("ViT, DeiT3, DINOv2, CLIP, SigLIP", ATTN + MLP + (
        "attn_pool.q", "attn_pool.kv", "attn_pool.proj")),
    "deit": Family("DeiT (distilled)", ATTN + MLP),
    "eva": Family("EVA, EVA02", ATTN + MLP + ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                "mlp.fc1_g", "mlp.fc1_x")),
    "beit": Family("BEiT, BEiTv2", ATTN + MLP),
    "swin_transformer": Family("Swin", ATTN + MLP),
    "swin_transformer_v2": Family("SwinV2", ATTN + MLP),
    "convnext": Family("ConvNeXt (1×1-conv or linear MLP)", MLP),
    "mlp_mixer": Family("MLP-Mixer, ResMLP, gMLP", ("mlp_tokens.fc1", "mlp_tokens.fc2", "mlp_channels.fc1",
                                                    "mlp_channels.fc2", "linear_tokens", "gate.proj")),
    "pit": Family("PiT", ATTN + MLP),
    "xcit": Family("XCiT", ATTN + MLP + ("attn.q", "attn.k", "attn.v")),
    "cait": Family("CaiT", ATTN + MLP + ("attn.q", "attn.k", "attn.v")),
    "maxxvit": Family("MaxViT, CoAtNet (attention blocks)", ATTN + MLP),
    "coat": Family("CoaT", ("factoratt_crpe.qkv", "factoratt_crpe.proj") + MLP),
    "levit": Family("LeViT", ("attn.qkv.linear", "attn.proj.ln.linear", "mlp.ln1.linear", "mlp.ln2.linear",
                              "attn_downsample.q.ln.linear", "attn_downsample.kv.linear",
                              "attn_downsample.proj.ln.linear")),
    "hiera": Family("Hiera", ATTN + MLP),
    "fastvit": Family("FastViT (1×1-conv MLP)", MLP + ("token_mixer.qkv", "token_mixer.proj")),
    "efficientformer": Family("EfficientFormer", ("token_mixer.qkv", "token_mixer.proj") + MLP),
    "twins": Family("Twins (PCPVT, SVT)", ATTN + MLP + ("attn.q", "attn.kv")),
    "crossvit": Family("CrossViT", ATTN + MLP + ("attn.wq", "attn.wk", "attn.wv")),
    "vision_transformer_sam": Family("SAM ViT", ATTN + MLP),
    "resnet": Family("ResNet", (), "it has no attention or MLP projection for LoRA to adapt"),
}

# a model outside timm's families: the names timm's ViT uses, as fastfair always defaulted to
GENERIC_TARGETS = ("qkv", "proj", "fc1", "fc2")

# a layer whose name has one of these components looks like an attention or MLP projection
_LOOKS_ADAPTABLE = re.compile(r"(^|\.)(attn\w*|attention|mlp\w*|token_mixer|factoratt\w*)(\.|$)")


def family_of(model: nn.Module) -> str | None:
    module = type(model).__module__
    return module.rsplit(".", 1)[-1] if module.startswith("timm.models.") else None


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The LoRA targets of ``model``'s timm family; ``GENERIC_TARGETS`` for a non-timm model."""
    fam = family_of(model)
    if fam is None:
        return GENERIC_TARGETS
    entry = FAMILIES.get(fam)
    if entry is None:  # a timm family not in the table: timm's usual block names
        return ATTN + MLP
    if entry.refuse:
        raise ValueError(f"{type(model).__name__} (timm family {fam!r}: {entry.models}) has no default LoRA "
                         f"targets: {entry.refuse}. Fine-tune it fully or as a linear probe, or pass "
                         "targets=[...] naming the Linear/Conv2d layers to adapt")
    return entry.targets


def classifier_names(model: nn.Module) -> list[str] | None:
    """The classifier module(s) of a timm model from its own metadata; None for other models.

    ``pretrained_cfg["classifier"]`` may name several (``head``, ``head_dist``) or a layer inside
    a head (LeViT's ``head.linear``); ``get_classifier()`` may return a tuple. The outermost of
    all the modules named is kept, so a whole head (with its norm and buffers) trains.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    names = [names] if isinstance(names, str) else list(names or ())
    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        names += [n for n, m in model.named_modules() if n and any(m is h for h in heads)]
    if not names and family_of(model) is None:
        return None
    present = {n for n, _ in model.named_modules()}
    names = sorted({n for n in names if n in present})
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def looks_adaptable(name: str, module: nn.Module) -> bool:
    """A linear or pointwise (1×1) convolution inside an attention or MLP block: a projection."""
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1) or module.groups != 1:
            return False  # depthwise or spatial convolutions mix positions, they do not project
    elif not hasattr(module, "in_features"):
        return False
    return _LOOKS_ADAPTABLE.search(name) is not None

"""Build a timm backbone for a task and set up what is trained: LoRA, full or linear probe."""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn

from .inject import InjectionSummary, count_params, inject_lora, name_matches, resolve_classifier
from .quant import quantize_backbone


def create_backbone(cfg, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the head sized to the task and the config's overrides."""
    kwargs = dict(cfg.model_kwargs)
    for key in ("img_size", "patch_size", "depth"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {cfg.model!r}") from e
        raise
    if cfg.checkpoint:
        load_backbone_weights(model, cfg.checkpoint)
    return model


def load_backbone_weights(model: nn.Module, path) -> list[str]:
    """Load local weights with timm's ``load_pretrained``; returns the keys left as initialized.

    timm reads the file (safetensors or torch) and runs the architecture's checkpoint filter
    (original DINOv2 / CLIP layouts, position embeddings resampled to the model's ``img_size``).
    The classifier is loaded only where its shape fits the task; any other misfit is an error
    naming the tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint file {p} not found")
    seen, dropped = {}, []

    def filter_fn(state, model):
        arch_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        state = arch_filter(state, model) if arch_filter is not None else state
        dropped.extend(_misfit_head(state, model))
        seen.update({k: v for k, v in state.items() if k not in dropped})
        return seen

    pcfg = {"file": str(p), "source": "", "num_classes": getattr(model, "num_classes", None),
            "classifier": None}
    try:
        timm.models.load_pretrained(model, pretrained_cfg=pcfg, num_classes=pcfg["num_classes"],
                                    filter_fn=filter_fn, strict=False)
    except RuntimeError as e:
        misfits = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ValueError(f"checkpoint {p} does not fit {type(model).__name__} ({len(misfits)} tensors): "
                         f"{'; '.join(misfits[:4]) or e}") from None
    own = model.state_dict()
    if not set(seen) & set(own):
        raise ValueError(f"checkpoint {p} matches no parameter of {type(model).__name__}")
    # strict=False above lets the classifier differ; anything else missing or extra is another
    # architecture (another depth, say), which would leave layers silently random
    head = set(_head_keys(model))
    extra = sorted(k for k in seen if k not in own)
    missing = sorted(k for k in own if k not in seen and k not in head)
    if extra or missing:
        raise ValueError(f"checkpoint {p} is another architecture than {type(model).__name__}: "
                         f"{len(extra)} tensors the model lacks {extra[:4]}, {len(missing)} the "
                         f"checkpoint lacks {missing[:4]} (depth or size differ?)")
    return dropped + [k for k in own if k not in seen and k not in dropped]


def _head_keys(model: nn.Module) -> list[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [f"{n}.{k}" for n, m in model.named_modules() if m is head and n for k in m.state_dict()]


def _misfit_head(state: dict, model: nn.Module) -> list[str]:
    """The classifier's tensors whose shape differs from the model's (a new task's head)."""
    own = model.state_dict()
    return [k for k in _head_keys(model) if k in state and state[k].shape != own[k].shape]


def setup_finetuning(model: nn.Module, cfg) -> InjectionSummary:
    """Freeze, quantize and inject according to ``cfg.finetune``; returns the parameter summary."""
    if cfg.finetune == "full":
        if cfg.int8:
            raise ValueError("int8=true stores a frozen backbone; it cannot be combined with finetune='full'")
        model.requires_grad_(True)
        summary = InjectionSummary()
    elif cfg.finetune == "linear":
        model.requires_grad_(False)
        trainable = resolve_classifier(model, cfg.trainable, "trainable")
        for name, module in model.named_modules():
            if name and name_matches(name, trainable):
                module.requires_grad_(True)
        summary = InjectionSummary()
    else:
        summary = inject_lora(model, targets=cfg.targets, r=cfg.rank, alpha=cfg.alpha,
                              dropout=cfg.lora_dropout, exclude=cfg.exclude, trainable=cfg.trainable,
                              use_rslora=cfg.use_rslora, backend=cfg.backend,
                              rank_pattern=cfg.rank_pattern, adapter_name=cfg.adapter_name)
    if cfg.int8:
        quantize_backbone(model, skip=cfg.trainable)
    summary.trainable_params, summary.total_params = count_params(model)
    if summary.trainable_params == 0:
        raise ValueError("nothing to train: no parameter requires a gradient")
    set_attention_backend(model, cfg.attn)
    return summary


def set_attention_backend(model: nn.Module, attn: str) -> None:
    """``sdpa``: timm's fused path, ``F.scaled_dot_product_attention``, which itself picks the flash
    or memory-efficient kernel on a GPU; ``eager``: timm's explicit softmax(QK^T)V (for debugging
    and double backward). Set per module through timm's own ``fused_attn`` switch."""
    if attn not in ATTENTION:
        raise ValueError(f"attn must be one of {tuple(ATTENTION)}, got {attn!r}")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = ATTENTION[attn]


ATTENTION = {"sdpa": True, "eager": False}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


__all__ = ["create_backbone", "load_backbone_weights", "setup_finetuning", "set_attention_backend",
           "trainable_parameters"]

"""Build a timm backbone for a task and set up what is trained: LoRA, full or linear probe."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import timm
import torch
import torch.nn as nn

from .inject import InjectionSummary, count_params, inject_lora, name_matches
from .quant import quantize_backbone


def create_backbone(cfg, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the head sized to the task and the config's overrides."""
    kwargs = dict(cfg.model_kwargs)
    for key in ("img_size", "patch_size", "depth"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if (cfg.pretrained or cfg.checkpoint) and cfg.depth is not None:
        raise ValueError(f"depth={cfg.depth} changes the architecture, so pretrained or checkpoint "
                         "weights cannot load; set depth to null")
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
    """Load local weights; the classifier's tensors whose shape differs are skipped and returned.

    The architecture's own timm converter runs first (original DINOv2 / CLIP layouts, position
    embeddings resampled to the model's ``img_size``); any other shape mismatch is an error.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint file {p} not found")
    state = timm.models.load_state_dict(str(p))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {f"{n}.{k}" for n, m in model.named_modules() if m is head and n for k in m.state_dict()}
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in skipped if k not in head_keys]
    if wrong:
        raise ValueError(f"checkpoint {p} does not fit {type(model).__name__} ({len(wrong)} tensors, "
                         f"checkpoint vs model): {wrong[:4]}")
    state = {k: v for k, v in state.items() if k not in skipped}
    result = model.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(own):
        raise ValueError(f"checkpoint {p} matches no parameter of {type(model).__name__}")
    return skipped + [k for k in result.missing_keys if k not in skipped]


def setup_finetuning(model: nn.Module, cfg) -> InjectionSummary:
    """Freeze, quantize and inject according to ``cfg.finetune``; returns the parameter summary."""
    if cfg.finetune == "full":
        if cfg.int8:
            raise ValueError("int8=true stores a frozen backbone; it cannot be combined with finetune='full'")
        model.requires_grad_(True)
        summary = InjectionSummary()
    elif cfg.finetune == "linear":
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name and name_matches(name, cfg.trainable):
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
    """``sdpa`` keeps timm's fused attention; ``xformers`` swaps in memory-efficient attention."""
    if attn == "sdpa":
        return
    if attn != "xformers":
        raise ValueError(f"attn must be 'sdpa' or 'xformers', got {attn!r}")
    try:
        import xformers.ops as xops
    except Exception as e:
        raise ValueError("attn='xformers' needs the xformers package (pip install 'fastfair[gpu]')") from e
    if not torch.cuda.is_available():
        raise ValueError("attn='xformers' needs a CUDA GPU: xformers has no CPU kernels; use attn='sdpa'")
    from timm.models.vision_transformer import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_xformers_forward(xops), module)
            n += 1
    if n == 0:
        raise ValueError(f"attn='xformers': {type(model).__name__} has no timm ViT attention to replace")


def _xformers_forward(xops):
    def forward(self, x, attn_mask=None, **_):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # xformers takes [B, N, heads, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        x = xops.memory_efficient_attention(q, k, v, attn_bias=attn_mask, p=p, scale=self.scale)
        x = self.norm(x.reshape(B, N, -1)) if hasattr(self, "norm") else x.reshape(B, N, -1)
        return self.proj_drop(self.proj(x))

    return forward


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


__all__ = ["create_backbone", "load_backbone_weights", "setup_finetuning", "set_attention_backend",
           "trainable_parameters"]

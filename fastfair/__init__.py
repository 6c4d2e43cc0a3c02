"""fastfair: Triton-accelerated fair parameter-efficient fine-tuning of vision models."""
from .adapters import load_adapter, save_adapter
from .data import build_datasets, group_balanced_sampler, validate_dataset
from .inject import InjectionSummary, inject_lora, lora_layers
from .lora import LoRALinear
from .losses import FairnessLoss, FairnessLossOutput
from .metrics import GroupMetrics, compute_metrics
from .ops.grouped_ce import check_flags, grouped_cross_entropy
from .quant import quantize_backbone

__version__ = "0.1.0"
__all__ = [
    "LoRALinear",
    "inject_lora",
    "lora_layers",
    "InjectionSummary",
    "quantize_backbone",
    "save_adapter",
    "load_adapter",
    "FairnessLoss",
    "FairnessLossOutput",
    "grouped_cross_entropy",
    "check_flags",
    "GroupMetrics",
    "compute_metrics",
    "build_datasets",
    "validate_dataset",
    "group_balanced_sampler",
]

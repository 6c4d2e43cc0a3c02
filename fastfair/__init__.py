"""fastfair: Triton-accelerated fair parameter-efficient fine-tuning of vision models.

Names are imported on first use, so ``from fastfair import LoRALinear`` does not pay for timm,
torchvision or the metrics stack.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LoRALinear": "lora",
    "LoRAConv2d": "lora_conv",
    "Int8Linear": "int8",
    "default_targets": "families",
    "classifier_names": "families",
    "inject_lora": "inject",
    "lora_layers": "inject",
    "InjectionSummary": "inject",
    "quantize_backbone": "quant",
    "save_adapter": "adapters",
    "load_adapter": "adapters",
    "FairnessLoss": "losses",
    "FairnessLossOutput": "losses",
    "grouped_cross_entropy": "ops.grouped_ce",
    "check_flags": "ops.grouped_ce",
    "GroupMetrics": "metrics",
    "compute_metrics": "metrics",
    "bootstrap": "metrics",
    "intersect_groups": "metrics",
    "intersect_group_names": "metrics",
    "write_report": "report",
    "compare_runs": "report",
    "build_datasets": "data",
    "validate_dataset": "data",
    "group_balanced_sampler": "data",
    "TrainConfig": "config",
    "train": "trainer",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastfair' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

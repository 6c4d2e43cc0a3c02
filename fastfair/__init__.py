"""fastfair: Triton-accelerated fair parameter-efficient fine-tuning of vision models.

Names are imported on first use, so ``from fastfair import LoRALinear`` does not pay for timm,
torchvision or the metrics stack.
"""
import importlib
import logging

__version__ = "0.1.0"


class _DropMessage(logging.Filter):
    """Drops one known log message of a third-party logger, and nothing else."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes warns on import on CPUs with AVX512-BF16 that an optional 4-bit CPU kernel (from
# the `kernels` package) is unavailable; fastfair uses no 4-bit op, so the line only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward"))

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

"""fastfair: Triton-accelerated fair parameter-efficient fine-tuning of vision models."""
from .adapters import load_adapter, save_adapter
from .inject import InjectionSummary, inject_lora, lora_layers
from .lora import LoRALinear
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
]

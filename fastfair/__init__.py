"""fastfair: Triton-accelerated fair parameter-efficient fine-tuning of vision models."""
from .lora import LoRALinear

__version__ = "0.1.0"
__all__ = ["LoRALinear"]

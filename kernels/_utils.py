"""Helpers shared by the kernels' launchers; no Triton import, nothing from ``fastfair``."""
from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2(n: int, least: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= ``n``, clamped to [``least``, ``cap``]."""
    p = max(least, 1 << max(int(n) - 1, 0).bit_length())
    return p if cap is None else min(p, cap)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here: tests patch this one hook to hand
    out NaN-filled buffers, so an element a kernel forgets shows as NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32, read through the API that is current.

    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee" / "none" = default, which is
    IEEE) when it exists: reading the legacy ``allow_tf32`` raises once a user has set the new
    API. Older torch: ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is not None:
        return prec == "tf32"
    return bool(matmul.allow_tf32)


def on_device(device: torch.device):
    """Launch on ``device``, not the current one (tensors on cuda:1 while cuda:0 is current)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()

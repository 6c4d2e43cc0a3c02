"""Which implementation runs an op, and nvtx ranges that cost nothing off the GPU."""
from __future__ import annotations

import contextlib
import functools

import torch

from .kernels._utils import interpreting

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


triton_interpreting = interpreting  # one definition, shared with the kernels' launchers


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for tensors on ``device``.

    ``auto`` picks Triton on CUDA and the PyTorch reference elsewhere. ``triton`` on CPU tensors is
    allowed only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the kernels are
    tested without a GPU.
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' was asked for but triton is not installed")
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1 "
            "set before fastfair is imported; use backend='torch' or 'auto' on the CPU"
        )
    return "triton"


@functools.cache
def _nvtx():
    if not torch.cuda.is_available():
        return None
    try:
        import nvtx
    except Exception:
        return None
    return nvtx


def nvtx_range(name: str):
    """An nvtx range when a GPU and the nvtx package are present, else a no-op context."""
    mod = _nvtx()
    if mod is None:
        return contextlib.nullcontext()
    return mod.annotate(name, domain="fastfair")

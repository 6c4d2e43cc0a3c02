"""Which LoRA-linear design runs: the name table, forcing, and the measured choice.

Designs (``DESIGNS``; docs/kernels/lora.md has the math and byte/FLOP counts of each):

==============  ===============================================================================
``reference``   plain PyTorch (``F.linear`` chain, torch dropout); the CPU path with dropout
``merged``      ``W' = W + Σ s·B·A`` once per call; ``y``, ``dX`` one dense GEMM each; ``dA``,
                ``dB`` from ``xa = x Aᵀ`` and ``g = dY B``. No dropout on the branch only.
``cublas``      cuBLAS base GEMM, then ``y += xa_s Bᵀ`` in place (unsloth-style chain)
``fused``       Triton GEMM adding the low-rank term in its epilogue; down-projection separate
``fused_inloop`` as ``fused``, the down-projection accumulated inside the GEMM's k-loop (R <= 64)
==============  ===============================================================================

An int8 base has a mode (``INT8_MODES``): ``dequant`` (into a 16-bit buffer, then the design's
dense path) or ``inloop`` (the fused GEMM reads int8; ``fused``/``fused_inloop`` only).

Forcing, for benchmarks and debugging (the context wins over the environment)::

    with fastfair.ops.lora.force_design("merged"):                 # or FASTFAIR_LORA_DESIGN=merged
        ...
    with fastfair.ops.lora.force_design("fused", int8="inloop"):   # FASTFAIR_LORA_INT8=inloop
        ...

A forced design that cannot run the call (``merged`` with dropout, a Triton design on the CPU
without ``TRITON_INTERPRET=1``) is a ``ValueError`` naming it; ``applicable()`` says beforehand.
``fused_inloop`` loops where the kernel can (total rank <= 64; the forward only without dropout)
and is ``fused`` elsewhere. Under ``torch.compile`` the choice is made while tracing and
baked into the graph: force before compiling.

Unforced, ``DesignChooser.choose`` times the applicable candidates on the first call of each key
(GPU name, dtype, M bucket, K, N, rank bucket, dropout, int8) with CUDA events, keeps the winner in
memory and in ``<cache dir>/lora_designs.json`` (``FASTFAIR_CACHE_DIR``, else the user cache
dir) under the GPU name and the torch/triton versions. It uses the cost model
(``fastfair.kernels.lora_tiles``) instead when there is nothing to time: on the CPU, in
deterministic mode, with ``FASTFAIR_AUTOTUNE=0``, or while compiling.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..kernels import lora_tiles as tiles

DESIGNS = {
    "reference": "plain PyTorch F.linear chain with torch dropout",
    "merged": "W' = W + sum s*B*A once per call; y and dX one GEMM each (no dropout only)",
    "cublas": "cuBLAS base GEMM, then y += xa_s B^T in place",
    "fused": "Triton GEMM, low-rank term in the epilogue, separate down-projection",
    "fused_inloop": "Triton GEMM, down-projection inside the k-loop",
}
TORCH_DESIGNS = ("reference", "merged")  # plain PyTorch: run on any device
TRITON_DESIGNS = ("cublas", "fused", "fused_inloop")  # fastfair.ops.lora_triton
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKEND_DESIGNS = {"torch": TORCH_DESIGNS, "triton": TRITON_DESIGNS, "auto": tuple(DESIGNS)}
INT8_MODES = {
    "dequant": "dequantize into a 16-bit buffer, then the design's dense path",
    "inloop": "the fused GEMM reads int8 and scales per row (fused designs only)",
}
ENV_DESIGN = "FASTFAIR_LORA_DESIGN"
ENV_INT8 = "FASTFAIR_LORA_INT8"
ENV_AUTOTUNE = "FASTFAIR_AUTOTUNE"
ENV_CACHE_DIR = "FASTFAIR_CACHE_DIR"
CACHE_FILE = "lora_designs.json"

_FORCED: contextvars.ContextVar = contextvars.ContextVar("fastfair_lora_design", default=(None, None))


class Choice(NamedTuple):
    design: str
    int8: str | None  # the int8 mode when the base is int8, else None
    source: str  # "forced", "measured", "cache" or "prior"


@dataclass(frozen=True)
class Problem:
    """One call's shape as the chooser sees it (``M`` = rows of x, ``rank`` = total rank)."""

    M: int
    K: int
    N: int
    rank: int
    dtype: torch.dtype
    dropout: bool
    int8: bool
    device: str  # "cpu" or "cuda"
    n_adapters: int = 1
    interpreting: bool = False  # Triton designs may run on CPU tensors (tests)


def _check_name(value, table: dict, what: str) -> None:
    if value is not None and value not in table:
        raise ValueError(f"{what} must be one of {sorted(table)} or None, got {value!r}")


@contextlib.contextmanager
def force_design(design: str | None = None, int8: str | None = None):
    """Force the design (a ``DESIGNS`` name) and/or int8 mode (``INT8_MODES``) inside the block.

    ``None`` leaves that part to the environment or the chooser. Nests; thread- and task-local.
    """
    _check_name(design, DESIGNS, "design")
    _check_name(int8, INT8_MODES, "int8")
    token = _FORCED.set((design, int8))
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced() -> tuple[str | None, str | None]:
    """The forced (design, int8 mode): the context manager's, else the environment's."""
    design, int8 = _FORCED.get()
    if design is None:
        design = os.environ.get(ENV_DESIGN) or None
        _check_name(design, DESIGNS, ENV_DESIGN)
    if int8 is None:
        int8 = os.environ.get(ENV_INT8) or None
        _check_name(int8, INT8_MODES, ENV_INT8)
    return design, int8


def why_not(design: str, p: Problem, int8_mode: str | None = None) -> str | None:
    """Why ``design`` cannot run ``p`` (a sentence), or None when it can."""
    if design == "merged" and p.dropout:
        return "merged needs no dropout on the LoRA branch (eval, or p = 0)"
    if design in TRITON_DESIGNS and p.device != "cuda" and not p.interpreting:
        return f"{design} runs Triton kernels: CUDA tensors or TRITON_INTERPRET=1"
    if design in TRITON_DESIGNS and p.dtype not in TRITON_DTYPES:
        return f"{design} takes {TRITON_DTYPES}, got {p.dtype}"
    if p.int8 and int8_mode == "inloop" and design not in ("fused", "fused_inloop"):
        return f"int8 mode inloop runs in the fused designs only, not {design}"
    return None


def applicable(design: str, p: Problem, int8_mode: str | None = None) -> bool:
    return why_not(design, p, int8_mode) is None


def candidates(p: Problem, backend: str = "auto") -> list[tuple[str, str | None]]:
    """(design, int8 mode) pairs that can run ``p`` under ``backend`` ("auto", "torch", "triton")."""
    names = BACKEND_DESIGNS[backend]
    if backend == "auto" and p.device != "cuda":
        names = TORCH_DESIGNS  # the Triton designs on CPU tensors only when asked for
    out = []
    for d in names:
        for mode in (INT8_MODES if p.int8 else (None,)):
            if applicable(d, p, mode):
                out.append((d, mode))
    return out


# -- the cost model: the prior ---------------------------------------------------------------
def predicted_seconds(design: str, int8_mode: str | None, p: Problem) -> float:
    """Predicted fwd+bwd time of one call on an H100 (``kernels.lora_tiles``): a prior, unmeasured.

    Counts the base GEMMs (forward, dX) and every extra pass over an M-sized tensor; the rank-R
    GEMMs' FLOPs are small beside the passes that feed them and are ignored.
    """
    e = p.dtype.itemsize
    M, K, N, R = p.M, p.K, p.N, p.rank
    t0 = 2.0 * M * N * K / tiles.GEMM_FLOPS
    pass_x, pass_y = e * M * K / tiles.HBM_BYTES, e * M * N / tiles.HBM_BYTES
    eff = 1.0 / tiles.TRITON_EFF
    dA_dB = 2 * pass_x + 2 * pass_y  # dA reads x (and g), dB reads dY (and xa)
    merge = 2 * (2.0 * N * K * R / tiles.GEMM_FLOPS + 3 * e * N * K / tiles.HBM_BYTES)
    # reference: drop(x) written and read; Triton: one Philox pass and M·K/8-byte bit reads
    mask = (2 * pass_x if design == "reference" else 0.5 * pass_x) if p.dropout else 0.0
    cost = {
        "reference": 2 * t0 + 4 * pass_y + 2 * pass_x + dA_dB + 2 * mask,
        "merged": 2 * t0 + merge + pass_x + pass_y + dA_dB,
        "cublas": 2 * t0 + pass_x + 2 * pass_y + pass_y + 2 * pass_x + dA_dB + mask,
        "fused": 2 * t0 * eff + pass_x + pass_y + dA_dB + mask,
        # forward: in the loop without dropout, else a separate masked pass; dX: g and dB in the
        # loop, dA a pass over x.
        "fused_inloop": ((t0 * eff + pass_x if p.dropout else t0 * eff * (1 + tiles.INLOOP_EXTRA))
                         + t0 * eff * (1 + tiles.INLOOP_EXTRA) + 2 * pass_x + mask),
    }[design]
    if p.int8 and int8_mode == "dequant":
        cost += 2 * (1 + e) * N * K / tiles.HBM_BYTES  # read int8, write 16-bit, forward and dX
    elif p.int8 and int8_mode == "inloop":
        cost += 2 * t0 * eff * (tiles.INT8_INLOOP_SLOWDOWN - 1)  # both base GEMMs convert in registers
    return cost


# -- the measured choice ---------------------------------------------------------------------
def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def problem_key(p: Problem) -> str:
    """The cache key: M and the rank in power-of-two buckets, so a last partial batch reuses it."""
    return (f"{str(p.dtype).removeprefix('torch.')}|M{_bucket(p.M)}|K{p.K}|N{p.N}|r{_bucket(p.rank, 16)}"
            f"|a{p.n_adapters}|drop{int(p.dropout)}|int8{int(p.int8)}")


def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastfair"


def device_tag(device: str = "cuda") -> str:
    """GPU name + torch/triton versions: a cached timing is valid only for all three."""
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device
    return f"{name}|torch {torch.__version__}|triton {tv}"


def timing_enabled() -> bool:
    return (os.environ.get(ENV_AUTOTUNE, "1") != "0"
            and not torch.are_deterministic_algorithms_enabled()
            and not torch.compiler.is_compiling())


Timer = Callable[[Problem, str, "str | None"], float]


class DesignChooser:
    """Picks a design per ``Problem``: forced, else remembered, else timed, else the prior.

    ``timer(problem, design, int8_mode) -> seconds`` is injected (``fastfair.ops.lora`` passes a
    CUDA-event timer; tests a fake one), so the logic runs and is tested on the CPU.
    """

    def __init__(self, timer: Timer | None = None, tag: Callable[[str], str] = device_tag):
        self.timer = timer
        self.tag = tag
        self.memory: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._loaded: set[str] = set()

    def choose(self, p: Problem, backend: str = "auto") -> Choice:
        cands = candidates(p, backend)
        design, mode = forced()
        if design is not None or (mode is not None and p.int8):
            return self._forced(p, cands, design, mode, backend)
        if not cands:
            raise ValueError(f"no LoRA design can run {p} with backend={backend!r}")
        if len(cands) == 1:
            return Choice(*cands[0], "prior")
        tag = self.tag(p.device)
        key = (tag, problem_key(p))
        self._load(tag)
        if key in self.memory and self.memory[key] in cands:
            return Choice(*self.memory[key], "cache")
        if self.timer is not None and p.device == "cuda" and timing_enabled():
            times = {c: self.timer(p, *c) for c in cands}
            best = min(times, key=times.get)
            self.memory[key] = best
            self._save(tag)
            return Choice(*best, "measured")
        best = min(cands, key=lambda c: predicted_seconds(c[0], c[1], p))
        return Choice(*best, "prior")

    def _forced(self, p, cands, design, mode, backend) -> Choice:
        if design is None:  # only the int8 mode is forced: best design that can take it
            ok = [c for c in cands if c[1] == mode]
            if not ok:
                raise ValueError(f"int8 mode {mode!r} cannot run this call: no applicable design")
            return Choice(*min(ok, key=lambda c: predicted_seconds(c[0], c[1], p)), "forced")
        if design not in BACKEND_DESIGNS[backend]:
            raise ValueError(f"forced LoRA design {design!r} is not a backend={backend!r} design "
                             f"{BACKEND_DESIGNS[backend]}")
        if p.int8 and mode is None:
            mode = "dequant"
        reason = why_not(design, p, mode)
        if reason:
            raise ValueError(f"forced LoRA design {design!r} cannot run this call: {reason}")
        return Choice(design, mode if p.int8 else None, "forced")

    # -- the JSON file: {device tag: {problem key: [design, int8 mode]}} ------------------------
    def _path(self) -> Path:
        return cache_dir() / CACHE_FILE

    def _read(self) -> dict:
        try:
            data = json.loads(self._path().read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            warnings.warn(f"ignoring the unreadable LoRA design cache {self._path()}: {err}", stacklevel=3)
            return {}

    def _load(self, tag: str) -> None:
        if tag in self._loaded:
            return
        self._loaded.add(tag)
        for k, v in self._read().get(tag, {}).items():
            if isinstance(v, list) and len(v) == 2 and v[0] in DESIGNS and (v[1] is None or v[1] in INT8_MODES):
                self.memory.setdefault((tag, k), (v[0], v[1]))

    def _save(self, tag: str) -> None:
        data = self._read()
        data[tag] = {k: list(v) for (t, k), v in self.memory.items() if t == tag}
        path = self._path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
        except OSError as err:  # a read-only home must not stop training; the choice stays in memory
            warnings.warn(f"could not write the LoRA design cache {path}: {err}", stacklevel=3)

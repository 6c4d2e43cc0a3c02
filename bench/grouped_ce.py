"""Microbenchmark: fused per-group cross-entropy + FairLoRA penalty vs what a user would write.

``python bench/grouped_ce.py`` on CUDA: N ∈ {4k, 64k} × C ∈ {2, 1000, 32k, 128k}, bf16 logits,
forward and forward+backward of ``FairnessLoss`` (Triton) against, in the same run,
``F.cross_entropy(reduction="none") + scatter_add + variance`` in PyTorch, liger-kernel's
cross-entropy with the same scatter and penalty when installed, and a device-to-device copy of the
logits (``x_copy``: time over one read and one write of the logits). Reports median ms, ratios
and peak memory above the inputs. On the CPU it runs one tiny shape through the reference path so
the script cannot rot.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Benchmark, Case, Timing, run_benchmarks  # noqa: E402

from fastfair.losses import FairnessLoss  # noqa: E402

G = 8


def pytorch_baseline(logits, labels, groups, lam=1.0):
    """The plain PyTorch a user would write: per-row CE, scatter to groups, variance penalty."""
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _scatter_penalty(loss, groups, lam)


def _scatter_penalty(loss, groups, lam):
    loss = loss.float()
    gsum = torch.zeros(G, device=loss.device).scatter_add(0, groups, loss)
    gcnt = torch.zeros(G, device=loss.device).scatter_add(0, groups, torch.ones_like(loss))
    present = gcnt > 0
    L = gsum / gcnt.clamp(min=1)
    k = present.sum().clamp(min=1)
    mean = torch.where(present, L, 0).sum() / k
    var = torch.where(present, L - mean, 0).pow(2).sum() / k
    return loss.mean() + lam * var


def liger_baseline():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None

    def fn(logits, labels, groups, lam=1.0):
        loss = liger_cross_entropy(logits, labels, reduction="none")
        return _scatter_penalty(loss, groups, lam)
    return fn


def _inputs(shape, device):
    gen = torch.Generator(device=device).manual_seed(0)
    N, C = shape["N"], shape["C"]
    x = torch.randn(N, C, device=device, generator=gen, dtype=_dtype(device)).requires_grad_()
    return (x, torch.randint(0, C, (N,), device=device, generator=gen),
            torch.randint(0, G, (N,), device=device, generator=gen))


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _loss_case(fn):
    def setup(shape, inputs, device):
        x, y, g = inputs
        return Case(lambda: fn(x, y, g), [x])
    return setup


def _fastfair(shape, inputs, device):
    backend = "triton" if device.type == "cuda" else "torch"
    loss = FairnessLoss(G, lam=1.0, backend=backend).to(device)
    x, y, g = inputs
    return Case(lambda: loss(x, y, g).loss, [x])


def _copy(shape, inputs, device):
    x = inputs[0].detach()
    dst = torch.empty_like(x)
    return Case(lambda: dst.copy_(x), note="the bandwidth reference: one read + one write of the logits, in every mode")


def providers() -> dict:
    table = {"pytorch": _loss_case(pytorch_baseline), "fastfair": _fastfair, "copy": _copy}
    if (liger := liger_baseline()) is not None:
        table["liger"] = _loss_case(liger)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--c", type=int, nargs="*", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny shape: the script runs")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else args.device)
    on_gpu = device.type == "cuda"
    ns = args.n or ([65536, 4096] if on_gpu else [64])
    cs = args.c or ([1000, 2, 32768, 131072] if on_gpu else [100])
    notes = ("FairnessLoss(penalty='variance', G=8) against F.cross_entropy(reduction='none') + "
             "scatter_add + variance in PyTorch (and liger-kernel's cross-entropy when installed); "
             "full = forward + the logits' gradient; memory = peak above what was allocated before.")
    if not on_gpu:
        notes += " CPU: one tiny shape, reference path; says nothing about the kernels."
    bench = Benchmark("grouped_ce", [dict(N=n, C=c) for n in ns for c in cs], providers(),
                      ("pytorch", "copy"), modes=("forward", "full", "memory"), make_inputs=_inputs,
                      notes=notes)
    timing = Timing(warmup_ms=10, rep_ms=40) if on_gpu else Timing(cpu_warmup=1, cpu_reps=3)
    md = run_benchmarks(bench, device, timing=timing, budget_s=args.budget_s, results_dir=args.results_dir)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmark: fused per-group cross-entropy + FairLoRA penalty vs what a user would write.

``python bench/grouped_ce.py`` on CUDA: N ∈ {4k, 64k} × C ∈ {2, 1000, 32k, 128k}, bf16 logits,
forward and forward+backward of ``FairnessLoss`` (Triton) against, in the same run,
``F.cross_entropy(reduction="none") + scatter_add + variance`` in PyTorch and, when installed,
liger-kernel's cross-entropy with the same scatter and penalty. Reports median ms, achieved
GB/s as a fraction of a measured device-to-device copy, and peak memory above the inputs.
On the CPU it runs one tiny shape through the reference path so the script cannot rot.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, peak_memory_mb, time_ms, write_results  # noqa: E402

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


def measure(name, fn, x, y, g, device, bytes_fwd, copy_gbs, logit_bytes):
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(x, y, g)
            moved = bytes_fwd
        else:
            xg = x.detach().requires_grad_()

            def run():
                return torch.autograd.grad(fn(xg, y, g), xg)
            moved = 3 * bytes_fwd  # read in forward, read and write in backward
        try:
            ms = time_ms(run, device)
            mem = peak_memory_mb(run, device)
        except torch.OutOfMemoryError:
            rows.append(dict(impl=name, mode=mode, ms="OOM"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row = dict(impl=name, mode=mode, ms=ms, GBps=moved / ms / 1e6)
        if copy_gbs:
            row["frac_copy_bw"] = row["GBps"] / copy_gbs
        if mem is not None:
            row["extra_MB"] = mem
            row["extra_pct_logits"] = 100 * mem * 2**20 / logit_bytes
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--c", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        ns, cs, dtype = args.n or [4096, 65536], args.c or [2, 1000, 32768, 131072], torch.bfloat16
        impls = {"fastfair": FairnessLoss(G, lam=1.0, backend="triton").to(device),
                 "pytorch": pytorch_baseline}
        if (liger := liger_baseline()) is not None:
            impls["liger"] = liger
    else:  # only so the script cannot rot: CPU times say nothing about the kernels
        ns, cs, dtype = args.n or [64], args.c or [100], torch.float32
        impls = {"fastfair-reference": FairnessLoss(G, lam=1.0, backend="torch"),
                 "pytorch": pytorch_baseline}

    rows = []
    for N in ns:
        for C in cs:
            gen = torch.Generator(device=device).manual_seed(0)
            try:
                x = torch.randn(N, C, device=device, generator=gen, dtype=dtype)
            except torch.OutOfMemoryError:
                rows.append(dict(N=N, C=C, impl="all", ms="OOM (logits)"))
                continue
            y = torch.randint(0, C, (N,), device=device, generator=gen)
            g = torch.randint(0, G, (N,), device=device, generator=gen)
            logit_bytes = x.numel() * x.element_size()
            copy_gbs = None
            if device.type == "cuda":
                dst = torch.empty_like(x)
                copy_gbs = 2 * logit_bytes / time_ms(lambda: dst.copy_(x), device) / 1e6
                del dst
            bytes_fwd = logit_bytes + N * (y.element_size() + g.element_size() + 8)
            per_shape = []
            for name, fn in impls.items():
                call = (lambda f: (lambda a, b, c: f(a, b, c).loss))(fn) if isinstance(fn, FairnessLoss) else fn
                per_shape += measure(name, call, x, y, g, device, bytes_fwd, copy_gbs, logit_bytes)
            for r in per_shape:
                base = next((b for b in per_shape if b["impl"] == "pytorch" and b["mode"] == r["mode"]), None)
                if base and isinstance(base.get("ms"), float) and isinstance(r.get("ms"), float):
                    r["speedup_vs_pytorch"] = base["ms"] / r["ms"]
                rows.append(dict(N=N, C=C, dtype=str(dtype).replace("torch.", ""),
                                 copy_GBps=copy_gbs, **r))
            del x

    cols = ["N", "C", "dtype", "impl", "mode", "ms", "speedup_vs_pytorch", "GBps",
            "copy_GBps", "frac_copy_bw", "extra_MB", "extra_pct_logits"]
    notes = ("FairnessLoss(penalty='variance', G=8) vs F.cross_entropy(reduction='none') + "
             "scatter_add + variance in PyTorch (and liger-kernel's cross-entropy when installed). "
             "GB/s counts the logits read once (fwd) or read twice and written once (fwd+bwd); "
             "frac_copy_bw is against a measured device-to-device copy of the logits; extra_MB is "
             "peak memory above what was allocated before the call (fwd+bwd includes the gradient).")
    if device.type != "cuda":
        notes += (" CPU run: one tiny shape through the reference path, so that the script cannot "
                  "rot; its times (on a shared machine) say nothing about the kernels.")
    md = write_results("grouped_ce", environment(device), rows, cols, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

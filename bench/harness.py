"""One harness for every microbenchmark: timing, peak memory, environment, JSON + markdown out.

On CUDA, times are medians from ``triton.testing.do_bench`` (it flushes L2 and syncs); on the
CPU, medians of wall-clock repeats, only so the scripts cannot rot (CPU numbers say nothing of
kernel speed).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    return env


def time_ms(fn, device: torch.device, warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call, above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def write_results(name: str, env: dict, rows: list[dict], columns: list[str], notes: str = "") -> Path:
    """Write ``bench/results/<name>-<device>.json`` and ``.md``; return the markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if env["device"].startswith("cuda") else "cpu"
    stem = RESULTS / f"{name}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [f"# {name}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if notes:
        lines += ["", notes]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md

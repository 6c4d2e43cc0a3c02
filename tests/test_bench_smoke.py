"""The benchmark harness and bench/gpu_check.py at toy sizes on the CPU: they run and write what
they promise (speed itself is never asserted here; benchmarks in bench/ measure it)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from harness import Benchmark, Case, NotApplicable, Timing, run_benchmarks  # noqa: E402


def _matmul(shape, inputs, device):
    x = torch.randn(shape["n"], shape["n"], requires_grad=True)
    w = torch.randn(shape["n"], shape["n"])
    return Case(lambda: x @ w, [x])


def _slow(shape, inputs, device):
    x = torch.randn(shape["n"], shape["n"], requires_grad=True)

    def fn():
        time.sleep(0.003)  # at least 3 ms a call, far above a tiny matmul's median
        return x * 2
    return Case(fn, [x])


def _not_here(shape, inputs, device):
    raise NotApplicable("needs a bigger n") if shape["n"] < 16 else NotApplicable("never")


def _broken(shape, inputs, device):
    raise RuntimeError("set-up bug")


def toy_bench():
    return Benchmark("toy", [dict(n=8), dict(n=16)],
                     {"mm": _matmul, "slow": _slow, "na": _not_here, "broken": _broken}, baselines=("mm",),
                     modes=("forward", "backward", "full", "memory", "host_forward"), notes="toy notes")


def test_harness_writes_rows_ratios_and_environment(tmp_path):
    timing = Timing(cpu_warmup=1, cpu_reps=3, rounds=2, host_calls=3)
    md = run_benchmarks(toy_bench(), "cpu", runners=("eager", "cuda_graph"), timing=timing,
                        results_dir=tmp_path)
    assert md == tmp_path / "toy-cpu.md"
    data = json.loads((tmp_path / "toy-cpu.json").read_text())
    env = data["env"]
    for key in ("date", "git_commit", "torch", "peft", "bitsandbytes", "cpu_count", "load_avg_1m_at_end"):
        assert key in env, key
    assert env["device"] == "cpu" and env["runners"] == ["eager"]  # no CUDA graphs on the CPU
    rows = data["rows"]
    # memory is CUDA-only; everything else was timed once per (shape, provider, mode)
    timed = [r for r in rows if "median" in r]
    assert {(r["n"], r["provider"], r["mode"]) for r in timed} == {
        (n, p, m) for n in (8, 16) for p in ("mm", "slow") for m in ("forward", "backward", "full", "host_forward")}
    assert all(r["unit"] == ("us" if r["mode"] == "host_forward" else "ms") for r in timed)
    slow = [r for r in timed if r["provider"] == "slow" and r["mode"] == "forward"]
    assert all(r["x_mm"] > 1.5 and "-" in r["x_mm_range"] for r in slow), slow
    assert all("x_mm" not in r for r in timed if r["provider"] == "mm")
    notes = {(r["n"], r["provider"]): r["note"] for r in rows if "median" not in r}
    assert notes[(8, "na")] == "n/a: needs a bigger n"
    assert notes[(16, "broken")].startswith("set-up failed: RuntimeError: set-up bug")
    text = md.read_text()
    assert "toy notes" in text and "| n | provider | runner | mode |" in text and "CPU wall-clock" in text


def test_harness_budget_lists_what_it_skipped(tmp_path):
    md = run_benchmarks(toy_bench(), "cpu", budget_s=0.0, timing=Timing(cpu_warmup=0, cpu_reps=1),
                        results_dir=tmp_path)
    data = json.loads((tmp_path / "toy-cpu.json").read_text())
    assert data["rows"] == [] and data["skipped_shapes"] == [dict(n=8), dict(n=16)]
    assert "Not measured (time budget spent): 2 shape(s)" in md.read_text()


ISOLATED_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {bench!r})
from harness import Benchmark, Case, Timing, run_benchmarks

def setup(shape, inputs, device):
    x = torch.randn(4, 4)
    return Case(lambda: x @ x, note=str(os.getpid()))

bench = Benchmark("iso", [dict(n=4)], {{"a": setup, "b": setup}}, baselines=("a",), modes=("full",))
timing = Timing(cpu_warmup=0, cpu_reps=2, rounds=3, isolate=(sys.executable, __file__))
run_benchmarks(bench, "cpu", timing=timing, results_dir={out!r})
print("parent", os.getpid())
"""


def test_harness_isolates_each_round_and_provider_in_its_own_process(tmp_path):
    script = tmp_path / "iso.py"
    script.write_text(ISOLATED_SCRIPT.format(bench=str(BENCH), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parent") == 1  # the children exit inside run_benchmarks
    data = json.loads((tmp_path / "iso-cpu.json").read_text())
    rows = {r["provider"]: r for r in data["rows"]}
    assert data["env"]["isolated"] is True and set(rows) == {"a", "b"}
    assert all(r["samples"] == 3 * 2 for r in rows.values())  # three rounds of two reps each
    assert "x_a" in rows["b"] and "-" in rows["b"]["x_a_range"]
    parent = int(proc.stdout.split()[-1])
    assert int(rows["a"]["note"]) != parent and rows["a"]["note"] != rows["b"]["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; the GPU runs the real one")
def test_gpu_check_cpu_smoke_writes_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--cpu-smoke", "--sections",
                           "grouped_ce", "--results-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert summary["smoke"] is True and summary["failed"] is False
    (sec,) = summary["sections"]
    assert sec["name"] == "grouped_ce" and sec["status"] == "passed"
    assert sec["results"] == ["grouped_ce-cpu.json"]
    rows = json.loads((tmp_path / "grouped_ce-cpu.json").read_text())["rows"]
    assert {r["provider"] for r in rows if "median" in r} >= {"pytorch", "fastfair", "copy"}
    assert "| grouped_ce | passed |" in (tmp_path / "gpu_check-cpu.md").read_text()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_unsloth_baseline_matches_the_reference(p):
    """The cuBLAS-chain baseline computes the LoRA layer (a wrong baseline would flatter fastfair)."""
    from lora_linear import CublasChain

    from fastfair.ops.lora import lora_linear_reference

    g = torch.Generator().manual_seed(0)
    d = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, W, A, B = d(3, 5, 12), d(7, 12), d(4, 12), d(7, 4)
    torch.manual_seed(1)
    y = CublasChain.apply(x, W.detach(), None, A, B, 0.5, p)
    torch.manual_seed(1)  # the same draw: the chain's keep-mask is rand >= p over x's rows
    keep = (torch.rand(15, 12, dtype=torch.float64) >= p).view(x.shape)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, A, B), dy)
    ref_y = lora_linear_reference(x, W.detach(), None, [A], [B], [0.5], [p], masks=[keep])
    want = torch.autograd.grad(ref_y, (x, A, B), dy)
    torch.testing.assert_close(y, ref_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

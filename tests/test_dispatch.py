"""The LoRA design chooser on the CPU: an injected timer stands in for CUDA events."""
import json
import math

import pytest
import torch

from fastfair.ops import lora_design as ld
from fastfair.ops.lora import design_for, force_design, lora_linear, lora_linear_reference

VIT_B = dict(M=256 * 197, K=768, N=768, rank=16, dtype=torch.bfloat16, int8=False, device="cuda")


def problem(**over):
    return ld.Problem(**{**VIT_B, "dropout": False, **over})


class FakeTimer:
    """Seconds per design from a table; counts the calls so a test sees when timing happens."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, p, design, int8_mode):
        self.calls.append((design, int8_mode))
        return self.times[design] + (0.5 if int8_mode == "inloop" else 0.0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ld.ENV_CACHE_DIR, str(tmp_path))
    for env in (ld.ENV_DESIGN, ld.ENV_INT8, ld.ENV_AUTOTUNE):
        monkeypatch.delenv(env, raising=False)
    return tmp_path / ld.CACHE_FILE


def chooser(times):
    timer = FakeTimer(times)
    return ld.DesignChooser(timer=timer, tag=lambda dev: f"fake-{dev}|torch x|triton y"), timer


TIMES = {"reference": 9.0, "merged": 3.0, "cublas": 2.0, "fused": 4.0, "fused_inloop": 5.0}


def test_first_use_times_every_candidate_then_remembers(cache):
    ch, timer = chooser(TIMES)
    c = ch.choose(problem())
    assert c == ld.Choice("cublas", None, "measured")
    assert sorted(d for d, _ in timer.calls) == sorted(ld.DESIGNS)
    timer.calls.clear()
    assert ch.choose(problem()) == ld.Choice("cublas", None, "cache") and timer.calls == []


def test_cache_file_round_trip_and_tag(cache):
    ch, _ = chooser(TIMES)
    ch.choose(problem(int8=True))
    data = json.loads(cache.read_text())
    assert list(data) == ["fake-cuda|torch x|triton y"]
    (key, value), = data["fake-cuda|torch x|triton y"].items()
    assert key == ld.problem_key(problem(int8=True)) and value == ["cublas", "dequant"]
    # A fresh process (a new chooser) reads the winner back without timing.
    ch2, timer2 = chooser({d: 1.0 for d in TIMES})
    assert ch2.choose(problem(int8=True)) == ld.Choice("cublas", "dequant", "cache") and not timer2.calls
    # Another GPU or version: its own entry, timed again.
    ch3, timer3 = chooser(TIMES)
    ch3.tag = lambda dev: "other-gpu|torch x|triton y"
    assert ch3.choose(problem(int8=True)).source == "measured" and timer3.calls


def test_corrupt_cache_is_ignored_with_a_warning(cache):
    cache.write_text("{not json")
    ch, _ = chooser(TIMES)
    with pytest.warns(UserWarning, match="unreadable"):
        assert ch.choose(problem()).source == "measured"
    assert json.loads(cache.read_text())  # rewritten whole


def test_key_buckets_m_and_rank_but_not_k_n_dtype_dropout():
    key = ld.problem_key
    assert key(problem(M=50000)) == key(problem(M=65536)) != key(problem(M=65537))
    assert key(problem(rank=9)) == key(problem(rank=16)) == key(problem(rank=3))
    assert key(problem(rank=17)) != key(problem(rank=16))
    for over in (dict(K=1024), dict(N=2304), dict(dtype=torch.float16), dict(dropout=True), dict(int8=True)):
        assert key(problem(**over)) != key(problem())


def test_forcing_context_beats_environment_and_skips_timing(cache, monkeypatch):
    ch, timer = chooser(TIMES)
    monkeypatch.setenv(ld.ENV_DESIGN, "fused")
    assert ch.choose(problem()) == ld.Choice("fused", None, "forced")
    with force_design("merged"):
        assert ch.choose(problem()) == ld.Choice("merged", None, "forced")
        with force_design("fused_inloop", int8="inloop"):
            assert ch.choose(problem(int8=True)) == ld.Choice("fused_inloop", "inloop", "forced")
        assert ch.choose(problem()).design == "merged"
    assert timer.calls == []
    monkeypatch.setenv(ld.ENV_DESIGN, "fastest")
    with pytest.raises(ValueError, match="FASTFAIR_LORA_DESIGN.*'fastest'"):
        ch.choose(problem())


def test_only_the_int8_mode_forced(cache):
    ch, _ = chooser(TIMES)
    with force_design(int8="inloop"):
        c = ch.choose(problem(int8=True))
    assert c.int8 == "inloop" and c.design in ("fused", "fused_inloop")


@pytest.mark.parametrize("design, over, match", [
    ("merged", dict(dropout=True), "no dropout"),
    ("fused", dict(device="cpu"), "TRITON_INTERPRET"),
    ("cublas", dict(dtype=torch.float64), "float64"),
])
def test_forcing_a_design_that_cannot_run_names_it(cache, design, over, match):
    ch, _ = chooser(TIMES)
    with force_design(design), pytest.raises(ValueError, match=f"'{design}'.*{match}"):
        ch.choose(problem(**over))


def test_dropout_excludes_merged_from_the_candidates(cache):
    ch, timer = chooser({**TIMES, "merged": 0.1})
    c = ch.choose(problem(dropout=True))
    assert c.design == "cublas" and "merged" not in [d for d, _ in timer.calls]


@pytest.mark.parametrize("off", ["env", "deterministic", "cpu"])
def test_prior_when_timing_is_off(cache, monkeypatch, off):
    ch, timer = chooser(TIMES)
    p = problem()
    if off == "env":
        monkeypatch.setenv(ld.ENV_AUTOTUNE, "0")
    elif off == "cpu":
        p = problem(device="cpu", dtype=torch.float32)
    torch.use_deterministic_algorithms(off == "deterministic")
    try:
        c = ch.choose(p)
    finally:
        torch.use_deterministic_algorithms(False)
    assert c.source == "prior" and timer.calls == [] and not cache.exists()
    want = min(ld.candidates(p), key=lambda d: ld.predicted_seconds(*d, p))
    assert (c.design, c.int8) == want


def test_prior_prefers_merged_without_dropout_at_vit_shapes():
    # PREDICTED (the cost model, no GPU measurement): merged saves the M-sized passes.
    p = problem()
    cost = {d: ld.predicted_seconds(d, None, p) for d in ld.DESIGNS}
    assert min(cost, key=cost.get) == "merged"
    p = problem(dropout=True)
    cost = {d: ld.predicted_seconds(d, None, p) for d, _ in ld.candidates(p)}
    assert "merged" not in cost and min(cost, key=cost.get) != "reference"


def test_cpu_dispatch_runs_merged_without_dropout_and_matches_float64(cache):
    torch.manual_seed(0)
    M, K, N = 300, 48, 40
    assert design_for(M, K, N, 8, dtype=torch.float64, device="cpu").design == "merged"
    x = torch.randn(3, M // 3, K, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True)
    As = [torch.randn(r, K, dtype=torch.float64, requires_grad=True) for r in (5, 3)]
    Bs = [torch.randn(N, r, dtype=torch.float64, requires_grad=True) for r in (5, 3)]
    leaves = [x, b, *As, *Bs]
    y = lora_linear(x, W, b, As, Bs, [0.5, -2.0], [0.1, 0.0], training=False)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    y_ref = lora_linear_reference(x, W, b, As, Bs, [0.5, -2.0], [0.1, 0.0], training=False)
    want = torch.autograd.grad(y_ref, leaves, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)

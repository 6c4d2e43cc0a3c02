"""Fused Triton LoRA on CUDA: bf16/fp16 at ViT layer shapes against float64, no host syncs."""
import math

import pytest
import torch

from fastfair.int8 import Int8Weight
from fastfair.kernels import _utils
from fastfair.kernels.lora import dropout_mask
from fastfair.ops import lora_design as ld
from fastfair.ops import lora_triton as lt
from fastfair.ops.lora import force_design, lora_linear, lora_linear_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SEED = 7
VIT_B = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (K, N): qkv, proj, fc1, fc2


@pytest.fixture(autouse=True)
def _pin_seed(monkeypatch):
    monkeypatch.setattr(lt, "_draw_seed", lambda device: SEED)
    monkeypatch.setattr(_utils, "alloc", lambda s, d, dev: torch.full(s, float("nan"), dtype=d, device=dev))


def check(M, K, N, dtype, ranks, ps, int8, design, int8_design, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(M + K + N)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x = rnd(M // 197, 197, K).to(dtype).requires_grad_()
    if int8:
        CB = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=gen)
        SCB = torch.rand(N, device="cuda", generator=gen) / math.sqrt(K) + 0.01
        w, w64 = Int8Weight(CB, SCB), Int8Weight(CB, SCB.double())
    else:
        w = (rnd(N, K) / math.sqrt(K)).to(dtype)
        w64 = w.double()
    b = rnd(N).to(dtype).requires_grad_()
    As = [(rnd(r, K) / math.sqrt(K)).requires_grad_() for r in ranks]
    Bs = [(rnd(N, r) / math.sqrt(r)).requires_grad_() for r in ranks]
    scales = [2.0 / (i + 1) for i in range(len(ranks))]
    with force_design(design, int8_design if int8 else None):
        y = lora_linear(x, w, b, As, Bs, scales, ps, True)
        dy = rnd(*y.shape).to(dtype)
        y.backward(dy)

    masks = [dropout_mask(SEED, M, K, p, a, "cuda").view(x.shape) if p > 0 else None
             for a, p in enumerate(ps)]
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    x64, b64, A64, B64 = d(x), d(b), [d(A) for A in As], [d(B) for B in Bs]
    y64 = lora_linear_reference(x64, w64, b64, A64, B64, scales, ps, True, masks=masks)
    y64.backward(dy.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    pairs = [("y", y, y64), ("dx", x.grad, x64.grad), ("dbias", b.grad, b64.grad)]
    pairs += [(f"dA{a}", As[a].grad, A64[a].grad) for a in range(len(ranks))]
    pairs += [(f"dB{a}", Bs[a].grad, B64[a].grad) for a in range(len(ranks))]
    for name, got, want in pairs:
        err = (got.double() - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), f"{name}: {err} vs max {want.abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K, N", VIT_B)
@pytest.mark.parametrize("design, p", [
    ("fused_inloop", 0.0),  # x Aᵀ, dY B and dB all inside the GEMMs' loops
    ("fused_inloop", 0.1),  # forward down-projection as a pass (dropout), dX's in the loop
    ("fused", 0.1), ("cublas", 0.1), ("merged", 0.0), ("cublas", 0.0)])
@pytest.mark.parametrize("r", [8, 64])
def test_vit_b_shapes(dtype, K, N, design, p, r, monkeypatch):
    check(8 * 197, K, N, dtype, [r], [p], False, design, None, monkeypatch)


@pytest.mark.parametrize("design, int8_design", [("fused", "dequant"), ("cublas", "dequant"),
                                                 ("fused", "inloop"), ("merged", "dequant")])
@pytest.mark.parametrize("K, N", [(1024, 4096), (4096, 1024)])  # ViT-L fc1, fc2
def test_int8_base_vit_l(design, int8_design, K, N, monkeypatch):
    check(4 * 197, K, N, torch.bfloat16, [16], [0.0], True, design, int8_design, monkeypatch)


@pytest.mark.parametrize("design", ld.TRITON_DESIGNS)
def test_stacked_adapters_rank_256(design, monkeypatch):
    check(2 * 197, 1024, 3072, torch.bfloat16, [256, 8, 1], [0.1, 0.0, 0.3], False, design, None,
          monkeypatch)


def test_training_step_has_no_host_sync(monkeypatch):
    monkeypatch.setattr(_utils, "alloc", lambda s, d, dev: torch.empty(s, dtype=d, device=dev))
    x = torch.randn(4 * 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    CB = torch.randint(-127, 128, (2304, 768), device="cuda", dtype=torch.int8)
    SCB = torch.rand(2304, device="cuda")
    A = torch.randn(16, 768, device="cuda", requires_grad=True)
    B = torch.randn(2304, 16, device="cuda", requires_grad=True)

    def step():
        y = lora_linear(x, Int8Weight(CB, SCB), None, [A, A], [B, B], [1.0, 0.5], [0.1, 0.2], True)
        y.backward(torch.ones_like(y))

    step()  # compiles, autotunes, caches the adapters' offsets
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _set_tf32(on: bool):
    """Set fp32 matmul precision through the current API (falls back to allow_tf32)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32" if on else "ieee"
        return lambda: setattr(m, "fp32_precision", old)
    old = m.allow_tf32
    m.allow_tf32 = on
    return lambda: setattr(m, "allow_tf32", old)


@pytest.mark.parametrize("tf32, tol", [(False, 1e-5), (True, 5e-3)])
@pytest.mark.parametrize("design, p", [("fused", 0.1), ("fused_inloop", 0.0), ("cublas", 0.1), ("merged", 0.0)])
def test_fp32_follows_the_matmul_precision_setting(tf32, tol, design, p, monkeypatch):
    # ieee: the fused kernels must not silently use TF32 (error ~1e-3 relative); tf32: within its error.
    restore = _set_tf32(tf32)
    try:
        M, K, N = 4 * 197, 768, 768
        gen = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(M, K, device="cuda", generator=gen, requires_grad=True)
        w = torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)
        A = (torch.randn(16, K, device="cuda", generator=gen) / math.sqrt(K)).requires_grad_()
        B = torch.randn(N, 16, device="cuda", generator=gen).requires_grad_()
        with force_design(design):
            y = lora_linear(x, w, None, [A], [B], [2.0], [p], True)
        dy = torch.randn_like(y)
        y.backward(dy)
        masks = [dropout_mask(SEED, M, K, p, 0, "cuda")] if p > 0 and design != "merged" else None
        d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
        x64, A64, B64 = d(x), d(A), d(B)
        y64 = lora_linear_reference(x64, w.double(), None, [A64], [B64], [2.0], [p], True, masks=masks)
        y64.backward(dy.double())
        for name, got, want in (("y", y, y64), ("dx", x.grad, x64.grad), ("dA", A.grad, A64.grad),
                                ("dB", B.grad, B64.grad)):
            err = (got.double() - want).abs().max().item() / want.abs().max().item()
            assert err <= tol, f"{name}: relative error {err} with tf32={tf32}"
    finally:
        restore()

"""The LoRA and grouped-CE custom ops under torch.library.opcheck and torch.compile(fullgraph=True).

The compile test uses the ``aot_eager`` backend: dynamo (graph breaks) and AOTAutograd (the ops'
fake implementations and registered autograd) run in full; only Inductor's C++ code generation,
minutes on a 2-core machine and not what the ops change, is left out.
"""
import os

import pytest
import timm
import torch

import fastfair.ops.lora as L
from fastfair import FairnessLoss, inject_lora
from fastfair.ops.grouped_ce import grouped_cross_entropy_reference, new_flags
from fastfair.ops.lora import force_design

K, N = 12, 10


def lora_args(int8=False, drop=(0.0, 0.0), design="merged", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, K, generator=g, dtype=dtype, requires_grad=True)
    if int8:
        w, ws = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g), torch.rand(N, generator=g) + 0.1
    else:
        w, ws = torch.randn(N, K, generator=g, dtype=dtype), None
    b = torch.randn(N, generator=g, dtype=dtype, requires_grad=True)
    A = [torch.randn(3, K, generator=g, requires_grad=True), torch.randn(2, K, generator=g)]
    B = [torch.randn(N, 3, generator=g, requires_grad=True), torch.randn(N, 2, generator=g, requires_grad=True)]
    seed = torch.tensor([1234]) if any(drop) else None
    return (x, w, ws, b, A, B, [0.5, 2.0], list(drop), seed, design, "dequant", True)


@pytest.mark.parametrize("kw", [
    dict(), dict(int8=True), dict(design="reference", drop=(0.1, 0.3)), dict(design="reference"),
    dict(design="fused", drop=(0.2, 0.0)), dict(dtype=torch.float64), dict(need_xa=False),
], ids=["merged", "merged-int8", "reference-dropout", "reference", "fused-on-cpu", "fp64", "eval-no-xa"])
def test_opcheck_lora_linear(kw):
    need_xa = kw.pop("need_xa", True)
    args = lora_args(**kw)
    if not need_xa:
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else
                     [a.detach() for a in t] if isinstance(t, list) and t and isinstance(t[0], torch.Tensor)
                     else t for t in args[:-1]) + (False,)
    torch.library.opcheck(torch.ops.fastfair.lora_linear.default, args)


def test_opcheck_lora_linear_backward():
    x, w, ws, b, A, B, scales, drop, seed, design, mode, _ = lora_args(design="reference", drop=(0.25, 0.0))
    y, xa, masks = torch.ops.fastfair.lora_linear(x, w, ws, b, A, B, scales, drop, seed, design, mode, True)
    args = (torch.randn_like(y), x.detach(), w, ws, [a.detach() for a in A], [t.detach() for t in B],
            xa.detach(), masks, seed, scales, drop, design, mode, [True, True, True, False, True, True])
    torch.library.opcheck(torch.ops.fastfair.lora_linear_backward.default, args)


def test_op_masks_are_drawn_once_and_reused_in_backward():
    # The packed forward masks are what backward reads: dA of a dropped adapter equals
    # g_aᵀ (keep_a ⊙ x) with the forward's keep, element for element.
    x, w, ws, b, A, B, scales, drop, seed, design, mode, _ = lora_args(design="reference", drop=(0.5, 0.0))
    y, xa, masks = torch.ops.fastfair.lora_linear(x, w, ws, b, A, B, scales, drop, seed, design, mode, True)
    dy = torch.randn_like(y)
    (dA0,) = torch.autograd.grad(y, [A[0]], dy)
    keep = L.unpack_bits(masks[0], K)
    g = dy.reshape(-1, N) @ (B[0] * (scales[0] / (1 - drop[0])))
    torch.testing.assert_close(dA0, g.t() @ (x.detach().reshape(-1, K) * keep))
    # xa_s holds the same mask: c_a (keep ⊙ x) A_aᵀ
    torch.testing.assert_close(xa[:, :3], (x.detach().reshape(-1, K) * keep) @ A[0].detach().t() * 1.0)


def _vit(int8: bool):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4,
                              depth=1 if int8 else 2)
    if int8:
        from fastfair import quantize_backbone
        quantize_backbone(model)
    inject_lora(model, r=4, alpha=8, dropout=0.1, backend="auto")
    with torch.no_grad():  # B = 0 at init would hide the LoRA branch (and its dropout) entirely
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


# int8 (bitsandbytes Linear8bitLt base, dequantized in the op) compiles and matches too; it takes
# 40-100 s more on 2 cores, so it runs with FASTFAIR_FULL_TESTS=1.
FULL = pytest.mark.skipif(os.environ.get("FASTFAIR_FULL_TESTS") != "1", reason="set FASTFAIR_FULL_TESTS=1")


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=[pytest.mark.slow, FULL])])
def test_vit_with_lora_and_fairness_loss_compiles_fullgraph_and_matches_eager(int8):
    # aot_eager runs the traced graph's random ops on eager's generator: dropout draws match.
    model = _vit(int8)
    loss_fn = FairnessLoss(3, lam=0.5, penalty="variance")
    x = torch.randn(4, 3, 32, 32)
    y, g = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        torch.manual_seed(1)
        out = fn(x, y, g)
        return out.loss, out.group_loss, torch.autograd.grad(out.loss, params)

    step = lambda x, y, g: loss_fn(model(x), y, g)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # raises on any graph break
    got = run(compiled)
    want = run(step)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b)
    # dropout really ran: the eval output differs from a training one
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x), (model.train(), model(x))[1])


def test_forced_design_is_baked_in_while_tracing():
    model = torch.nn.Sequential(torch.nn.Linear(K, N))
    inject_lora(model, r=2, alpha=2, dropout=0.0, targets=("0",), backend="torch")
    x = torch.randn(3, K)
    torch._dynamo.reset()
    with force_design("reference"):
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, model(x))


def ce_args(dtype=torch.float32, smoothing=0.0):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 5, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 1, 4, -100, 2, 3, 1, 0, 4])
    groups = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1, 0])
    return logits, labels, groups, 3, -100, smoothing, new_flags()


@pytest.mark.parametrize("dtype, smoothing", [(torch.float32, 0.0), (torch.float64, 0.1)])
def test_opcheck_grouped_cross_entropy(dtype, smoothing):
    torch.library.opcheck(torch.ops.fastfair.grouped_cross_entropy.default, ce_args(dtype, smoothing))


def test_grouped_ce_op_gradient_matches_reference_autograd_in_float64():
    logits, labels, groups, G, ii, eps, flags = ce_args(torch.float64, 0.2)
    w_loss, w_sum = torch.randn(9, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    loss, gsum, gcount, _, _ = torch.ops.fastfair.grouped_cross_entropy(logits, labels, groups, G, ii, eps, flags)
    (got,) = torch.autograd.grad((loss * w_loss).sum() + (gsum * w_sum).sum(), [logits])
    ref = grouped_cross_entropy_reference(logits, labels, groups, G, ii, eps)
    (want,) = torch.autograd.grad((ref[0] * w_loss).sum() + (ref[1] * w_sum).sum(), [logits])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gcount, ref[2])


def test_compiled_loss_records_bad_rows_in_its_flags():
    loss_fn = FairnessLoss(2, penalty="variance")
    logits = torch.randn(4, 3)
    bad_groups = torch.tensor([0, 1, 7, 0])  # row 2: group 7 outside [0, 2)
    torch._dynamo.reset()
    out = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(logits, torch.tensor([0, 1, 2, 1]), bad_groups)
    assert torch.isnan(out.loss)
    with pytest.raises(ValueError, match=r"group out of range, the first at row 2 \(group = 7\)"):
        loss_fn.check()

"""LoRALinear (reference path) against float64 math, plus adapters, merging and argument errors."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fastfair import LoRALinear
from fastfair.ops.lora import draw_masks, draw_seed, unpack_bits
from fastfair.backend import triton_interpreting


def make_layer(k, n, r, alpha=16.0, dropout=0.0, bias=True, rslora=False, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(k, n, bias=bias), r=r, alpha=alpha, dropout=dropout,
                       use_rslora=rslora, backend="torch")
    with torch.no_grad():  # B starts at zero; give it values so the low-rank branch is exercised
        layer.lora_B["default"].normal_(0, 0.5)
    return layer


def float64_lora(x, W, b, adapters):
    """y = x Wᵀ + b + Σ s·(m ⊙ x / (1-p)) Aᵀ Bᵀ in float64; adapters = [(A, B, s, keep_mask, p)]."""
    x, W = x.double(), W.double()
    y = x @ W.T + (0 if b is None else b.double())
    for A, B, s, mask, p in adapters:
        xd = x if mask is None else x * mask.double() / (1 - p)
        y = y + s * (xd @ A.double().T) @ B.double().T
    return y


shapes = st.tuples(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),  # leading batch dims
    st.integers(1, 40), st.integers(1, 40), st.integers(1, 64),  # in, out, rank
)


@given(shapes, st.booleans(), st.booleans(), st.floats(0.5, 64))
def test_forward_and_grads_match_float64(shape, bias, rslora, alpha):
    lead, k, n, r = shape
    layer = make_layer(k, n, r, alpha=alpha, bias=bias, rslora=rslora)
    x = torch.randn(*lead, k, requires_grad=True)
    y = layer(x)
    scale = alpha / (math.sqrt(r) if rslora else r)
    assert math.isclose(layer.adapters["default"].scale, scale)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x64 = x.detach().double().requires_grad_()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    y64 = float64_lora(x64, layer.base.weight, layer.base.bias, [(A64, B64, scale, None, 0.0)])
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y64)
    y.backward(g.float())
    y64.backward(g)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=1e-4, atol=1e-4)
    assert layer.base.weight.grad is None and (layer.base.bias is None or layer.base.bias.grad is None)


@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 16), st.floats(0.05, 0.9), st.integers(0, 2**31))
def test_dropout_matches_float64_with_same_mask(k, n, r, p, seed):
    layer = make_layer(k, n, r, dropout=p)
    layer.train()
    x = torch.randn(3, 5, k)
    torch.manual_seed(seed)
    y = layer(x)
    torch.manual_seed(seed)  # the CPU path draws one seed, then its packed mask from that seed
    mask = unpack_bits(draw_masks(draw_seed("cpu"), 15, k, [p]), k)[0].view(3, 5, k)
    cfg = layer.adapters["default"]
    ref = float64_lora(x, layer.base.weight, layer.base.bias,
                       [(layer.lora_A["default"], layer.lora_B["default"], cfg.scale, mask, p)])
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    layer.eval()  # no dropout at eval
    ref_eval = float64_lora(x, layer.base.weight, layer.base.bias,
                            [(layer.lora_A["default"], layer.lora_B["default"], cfg.scale, None, 0)])
    torch.testing.assert_close(layer(x).double(), ref_eval, rtol=1e-4, atol=1e-4)


def test_fresh_layer_equals_base_and_init_like_peft():
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, backend="torch")
    x = torch.randn(7, 32)
    assert torch.equal(layer(x), base(x))
    A = layer.lora_A["default"]
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=√5) on fan_in=32
    assert A.abs().max() <= bound and A.abs().max() > bound / 2
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.lora_A["default"], layer.lora_B["default"]]


@given(st.integers(1, 16), st.integers(1, 16), st.integers(1, 8), st.integers(1, 8))
def test_merge_unmerge_exact(k, n, r1, r2):
    layer = make_layer(k, n, r1)
    layer.add_adapter("second", r=r2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B["second"].normal_()
    x = torch.randn(4, k)
    w0 = layer.base.weight.clone()
    y = layer(x)
    layer.merge()
    assert layer.merged == ["default", "second"]
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.base.weight, layer.base.bias), y,
                               rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_several_adapters_summed_one_frozen():
    layer = make_layer(12, 10, 4)
    layer.add_adapter("task", r=2, alpha=4.0, trainable=True)
    layer.set_trainable("default", False)
    with torch.no_grad():
        layer.lora_B["task"].normal_()
    x = torch.randn(5, 12)
    cfg_d, cfg_t = layer.adapters["default"], layer.adapters["task"]
    adapters = [(layer.lora_A[n], layer.lora_B[n], c.scale, None, 0) for n, c in
                (("default", cfg_d), ("task", cfg_t))]
    y = layer(x)
    torch.testing.assert_close(y.double(), float64_lora(x, layer.base.weight, layer.base.bias, adapters),
                               rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.lora_A["default"].grad is None and layer.lora_B["default"].grad is None
    assert layer.lora_A["task"].grad is not None and layer.lora_B["task"].grad.abs().sum() > 0
    layer.set_active(["task"])
    torch.testing.assert_close(layer(x).double(), float64_lora(x, layer.base.weight, layer.base.bias,
                                                               adapters[1:]), rtol=1e-5, atol=1e-5)
    layer.set_active([])
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(r=0), "r=0"), (dict(r=2.5), "r=2.5"), (dict(alpha=0), "alpha=0"), (dict(alpha=-1), "alpha=-1"),
    (dict(dropout=1.0), "dropout=1.0"), (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(backend="cuda"), "'cuda'"),
])
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=__import__("re").escape(needle)):
        LoRALinear(nn.Linear(4, 4), **kwargs)


def test_bad_base_and_input():
    with pytest.raises(ValueError, match="Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1))
    layer = LoRALinear(nn.Linear(8, 4), backend="torch")
    with pytest.raises(ValueError, match=r"in_features=8.*\(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_active(["nope"])
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = LoRALinear(nn.Linear(8, 4), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        layer(torch.randn(2, 8))


def test_set_active_takes_a_merged_adapter_out_of_the_weight():
    layer = make_layer(6, 5, 2)
    layer.add_adapter("b", r=3)
    with torch.no_grad():
        layer.lora_B["b"].normal_()
    x = torch.randn(4, 6)
    layer.set_active(["b"])
    y_b = layer(x)
    layer.set_active(["default", "b"])
    layer.merge()
    layer.set_active(["b"])  # 'default' stops counting although it was folded into the weight
    torch.testing.assert_close(layer(x), y_b, rtol=1e-5, atol=1e-5)
    assert layer.merged == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_keeps_float32_adapters_that_learn(dtype):
    torch.manual_seed(0)
    base = nn.Linear(64, 16).to(dtype)
    layer = LoRALinear(base, r=4, backend="torch")
    assert layer.lora_A["default"].dtype == torch.float32  # as peft: fp32 weights for the optimizer
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(8, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = float64_lora(x, base.weight, base.bias, [(layer.lora_A["default"], layer.lora_B["default"],
                                                   layer.adapters["default"].scale, None, 0)])
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)
    A0 = layer.lora_A["default"].detach().clone()
    opt = torch.optim.AdamW([layer.lora_A["default"], layer.lora_B["default"]], lr=1e-4)
    y.float().square().mean().backward()
    opt.step()
    # a first Adam step moves each entry by ~lr; in half precision it would round away
    assert ((layer.lora_A["default"] - A0).abs() > 5e-5).float().mean() > 0.9
    layer.merge()
    torch.testing.assert_close(base(x), layer(x))
    layer.unmerge()


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreting()),
                    reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_path_follows_autocast_like_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter cannot do bf16 dots
    outs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        layer = LoRALinear(nn.Linear(32, 16), r=4, backend=backend).to(device)
        with torch.no_grad():
            layer.lora_B["default"].normal_()
        x = torch.randn(5, 32, device=device, requires_grad=True)
        with torch.autocast(device, dtype=dtype):
            y = layer(x)
        y.float().sum().backward()
        outs[backend] = (y, x.grad, layer.lora_B["default"].grad)
    assert outs["triton"][0].dtype == outs["torch"][0].dtype == dtype
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_weight_is_the_effective_weight_and_trains_the_adapters():
    # timm's EVA/BEiT/SwinV2 call F.linear(x, layer.qkv.weight, bias): that path must train LoRA too
    layer = make_layer(12, 10, 4)
    layer.add_adapter("b", r=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B["b"].normal_()
    layer.set_active(["default", "b"])
    x = torch.randn(5, 12)
    y = layer(x)
    y_w = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y_w, y, rtol=1e-5, atol=1e-5)
    grads = []
    for out in (y, y_w):
        layer.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in (layer.lora_A["default"], layer.lora_B["b"])])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    layer.merge()  # merged adapters sit in the base: not added twice
    torch.testing.assert_close(layer.weight, layer.base.weight)


def test_weight_path_warns_once_that_dropout_is_skipped():
    layer = make_layer(6, 4, 2, dropout=0.1)
    layer.train()
    with pytest.warns(UserWarning, match="dropout cannot apply"):
        layer.weight
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.weight  # once per layer, not per step
        layer.eval()
        layer.weight


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_integer_and_complex_input_refused_like_nn_linear(dtype):
    layer = LoRALinear(nn.Linear(4, 3), backend="torch")
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        layer(torch.ones(2, 4).to(dtype))


def test_float64_stays_float64_through_merge_and_unmerge():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).double()
    layer = LoRALinear(base, r=4, backend="torch")
    assert layer.lora_A["default"].dtype == torch.float64
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    w0, y = base.weight.detach().clone(), layer(x)
    size = (w0.abs() + layer.delta_weight("default").abs()).max()
    layer.merge()
    assert base.weight.dtype == torch.float64
    torch.testing.assert_close(layer(x), y, rtol=1e-13, atol=1e-13)
    layer.unmerge()
    # float32 rounding would leave ~5e-8; float64 arithmetic leaves the last bit of W + ΔW at most
    assert (base.weight - w0).abs().max() <= 2 * torch.finfo(torch.float64).eps * size


def test_int8_base_weight_is_dequantized_effective_weight():
    from fastfair import quantize_backbone

    model = nn.Sequential(nn.Linear(8, 6))
    quantize_backbone(model, skip=())
    layer = LoRALinear(model[0], r=2, backend="torch")
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    W = layer.base.CB.float() * layer.base.SCB[:, None] / 127
    torch.testing.assert_close(layer.weight, W + layer.delta_weight("default"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.weight, layer.bias), layer(x))

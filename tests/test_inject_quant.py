"""inject_lora on timm and plain models; int8 backbones against their dequantized float reference."""
import pytest
import timm
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fastfair import LoRALinear, inject_lora, lora_layers, quantize_backbone
from fastfair.quant import weight_memory_bytes


def tiny_vit(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, **kw)


@pytest.mark.parametrize("name, extra", [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch14_dinov2", {}),
    ("vit_base_patch16_clip_224", dict(embed_dim=64, num_heads=2)),
])
def test_inject_timm_vits(name, extra):
    model = tiny_vit(name, **extra)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    y0 = model(x)
    summary = inject_lora(model, r=4, alpha=8, backend="torch")
    expected = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert sorted(summary.wrapped) == sorted(expected)
    assert sorted(lora_layers(model)) == sorted(expected)
    torch.testing.assert_close(model(x), y0)  # B = 0: same function as before
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    assert summary.trainable_params == sum(model.get_parameter(n).numel() for n in trainable)
    assert summary.total_params == sum(p.numel() for p in model.parameters())


def test_inject_regex_exclude_any_module_and_second_adapter():
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)))
    model.add_module("out_proj", nn.Linear(8, 3))
    model.add_module("proj", nn.Linear(3, 3))
    s = inject_lora(model, targets=("proj",), trainable=())
    assert s.wrapped == ["proj"]  # 'proj' is a whole-name suffix: out_proj is not matched
    s = inject_lora(model, targets=r"enc\.\d+", exclude=("2",), adapter_name="task", trainable=())
    assert s.wrapped == ["enc.0"]
    s = inject_lora(model, targets=("proj", "enc.0"), adapter_name="second", trainable=())
    assert set(model.proj.adapters) == {"default", "second"}
    # earlier adapters are frozen, the new one trains
    assert not model.proj.lora_A["default"].requires_grad and model.proj.lora_A["second"].requires_grad
    with pytest.raises(ValueError, match="no linear layer matches targets=.*'nothing'"):
        inject_lora(model, targets=("nothing",))


def test_rank_pattern():
    model = tiny_vit()
    inject_lora(model, r=4, rank_pattern={"blocks.1.mlp.fc1": 16, "qkv": 2})
    assert model.blocks[1].mlp.fc1.adapters["default"].r == 16
    assert model.blocks[0].attn.qkv.adapters["default"].r == 2
    assert model.blocks[0].mlp.fc1.adapters["default"].r == 4


@given(st.integers(1, 48), st.integers(1, 48), st.integers(1, 8), st.booleans())
def test_int8_base_matches_dequantized_float64(k, n, r, bias):
    torch.manual_seed(k * 100 + n)
    lin = nn.Linear(k, n, bias=bias)
    model = nn.Sequential(lin)
    quantize_backbone(model, skip=())
    q = model[0]
    layer = LoRALinear(q, r=r, backend="torch")
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    assert layer.is_int8 and q.weight.CB.dtype == torch.int8
    W = q.weight.CB.double() * q.weight.SCB.double()[:, None] / 127
    # row-wise absmax int8: each weight within one quantization step of its row
    step = lin.weight.detach().abs().amax(1, keepdim=True).double() / 127
    assert ((W - lin.weight.double()).abs() <= step).all()
    x = torch.randn(3, k, requires_grad=True)
    y = layer(x)
    s = layer.adapters["default"].scale
    A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    ref = x.double() @ W.T + (lin.bias.double() if bias else 0) + s * (x.double() @ A.T) @ B.T
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    gx = torch.ones(3, n).double() @ (W + s * B @ A)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-4, atol=1e-4)


def test_quantize_vit_memory_and_merge_rules():
    model = tiny_vit()
    before = weight_memory_bytes(model)
    inject_lora(model, r=4, backend="torch")
    summary = quantize_backbone(model)
    assert len(summary.layers) == 8 and "head" not in summary.layers
    assert summary.weight_bytes_after < 0.3 * summary.weight_bytes_before
    assert weight_memory_bytes(model) < before
    assert type(model.head) is nn.Linear and model.head.weight.requires_grad
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()  # trains through int8 bases
    assert model.blocks[0].attn.qkv.lora_A["default"].grad is not None
    layer = model.blocks[0].attn.qkv
    with pytest.raises(ValueError, match="dequantize=True"):
        layer.merge()
    model.eval()
    y = model(x)
    layer.merge(dequantize=True)
    assert not layer.is_int8
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bits=4"):
        quantize_backbone(tiny_vit(), bits=4)


def test_int8_base_follows_a_move_and_bnb_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    quantize_backbone(model, skip=())
    x = torch.randn(3, 8)
    ref = model[0](x)  # bitsandbytes' own forward moves CB/SCB from the weight to layer.state
    layer = LoRALinear(model[0], r=2, backend="torch")
    W = layer.base.state.CB.float() * layer.base.state.SCB[:, None] / 127
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, W, layer.base.bias))
    torch.testing.assert_close(layer(x), ref, rtol=0.05, atol=0.05)  # bnb quantizes x too
    # .to(device)/.cuda() swap weight.data in place and leave CB behind on the old device;
    # a clone stands in for the move, and the stale storage is wiped to show which one is read
    q = LoRALinear(model[1], r=2, backend="torch")
    with torch.no_grad():
        q.lora_B["default"].normal_()
    h = torch.randn(3, 6)
    y = q(h)
    stale = q.base_weight().CB
    q._apply(lambda t: t.clone())
    stale.zero_()
    torch.testing.assert_close(q(h), y)


def test_unwrapped_int8_layer_follows_a_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    quantize_backbone(model, skip=())
    x = torch.randn(3, 8)
    before = weight_memory_bytes(model)
    y = model(x)  # bitsandbytes' own forward: CB and SCB now live in layer.state
    assert weight_memory_bytes(model) == before == 6 * 8 + 6 * 4
    stale = model[0].state.CB
    model._apply(lambda t: t.clone())  # stands in for .cuda(): weight.data is replaced in place
    stale.zero_()
    torch.testing.assert_close(model(x), y)


def test_trainable_module_around_lora_layers_keeps_bases_and_other_adapters_frozen():
    model = tiny_vit()
    inject_lora(model, r=2, adapter_name="upstream", trainable=())
    quantize_backbone(model, skip=("head", "blocks.1.mlp"))  # leaves blocks.1.mlp.fc1/fc2 dense
    inject_lora(model, targets=("qkv",), r=2, adapter_name="task", trainable=("blocks.1", "head"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.1.norm1.weight" in trainable and "head.weight" in trainable
    assert "blocks.1.attn.qkv.lora_A.task" in trainable
    assert not any(".base." in n or "upstream" in n for n in trainable), sorted(trainable)

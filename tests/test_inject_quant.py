"""inject_lora on timm and plain models; int8 backbones against their dequantized float reference."""
import pytest
import timm
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fastfair import LoRALinear, inject_lora, lora_layers, quantize_backbone
from fastfair.int8 import Int8Linear, bnb_linear8bit
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
    with pytest.raises(ValueError, match="no Linear/Conv2d layer matches targets=.*'nothing'"):
        inject_lora(model, targets=("nothing",))


def test_second_adapter_on_conv_and_linear_layers():
    model = tiny_vit()
    inject_lora(model, targets=["qkv", "proj"], r=2, backend="torch")  # 'proj' also names patch_embed.proj
    inject_lora(model, targets=["qkv", "proj"], r=3, adapter_name="task", backend="torch")
    assert set(model.patch_embed.proj.adapters) == {"default", "task"}
    assert model.patch_embed.proj.lora_A["task"].shape == (3, 3, 8, 8)


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
    assert layer.is_int8 and q.CB.dtype == torch.int8
    W = q.CB.double() * q.SCB.double()[:, None] / 127
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


def bnb_layer(k, n, seed=0):
    """A bitsandbytes Linear8bitLt quantized the way bitsandbytes does it (on a move off its CPU copy)."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    return bnb_linear8bit(lin), lin


def test_bnb_base_is_taken_over_exactly_and_runs_weight_only():
    q, lin = bnb_layer(8, 6)
    x = torch.randn(3, 8)
    bnb_y = q(x)  # bitsandbytes' own forward moves CB/SCB from the weight to q.state
    CB, SCB = q.state.CB.clone(), q.state.SCB.clone()
    layer = LoRALinear(q, r=2, backend="torch")
    assert isinstance(layer.base, Int8Linear)
    assert torch.equal(layer.base.CB, CB) and torch.equal(layer.base.SCB, SCB)  # no requantization
    W = CB.float() * SCB[:, None] / 127
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, W, q.bias))
    torch.testing.assert_close(layer(x), bnb_y, rtol=0.05, atol=0.05)  # bnb quantizes x too
    # quantize_backbone takes an unwrapped Linear8bitLt over the same way
    model = nn.Sequential(bnb_layer(8, 6, seed=1)[0])
    quantize_backbone(model, skip=())
    assert isinstance(model[0], Int8Linear)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unwrapped_int8_layers_are_weight_only_any_rank(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    dense = [m.weight.detach().clone() for m in model]
    quantize_backbone(model, skip=())
    getattr(model, mode)()
    for shape in [(8,), (3, 8), (2, 2, 2, 8)]:  # swin's downsample.reduction sees 4-D input
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = model(x)
        assert y.dtype == torch.float64 and y.shape == (*shape[:-1], 4)
        h = x
        for m in model:  # weight-only: the activations are not quantized
            h = torch.nn.functional.linear(h, m.CB.double() * m.SCB.double()[:, None] / 127, m.bias.double())
        torch.testing.assert_close(y, h, rtol=1e-12, atol=1e-12)
        y.sum().backward()
        assert x.grad is not None
    for m, w in zip(model, dense):
        assert ((m.weight - w).abs() <= w.abs().amax(1, keepdim=True) / 127).all()
    with pytest.raises(TypeError, match="int64"):
        model(torch.ones(2, 8, dtype=torch.long))


def test_int8_storage_follows_a_move_and_counts_its_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    quantize_backbone(model, skip=())
    x = torch.randn(3, 8)
    y = model(x)
    assert weight_memory_bytes(model) == 6 * 8 + 6 * 4
    stale = model[0].CB
    model._apply(lambda t: t.clone())  # stands in for .cuda(): every buffer is replaced
    stale.zero_()
    torch.testing.assert_close(model(x), y)
    layer = LoRALinear(model[0], r=2, backend="torch")
    layer._apply(lambda t: t.clone())
    assert layer.base_weight().CB.data_ptr() == layer.base.CB.data_ptr()


def test_trainable_module_around_lora_layers_keeps_bases_and_other_adapters_frozen():
    model = tiny_vit()
    inject_lora(model, r=2, adapter_name="upstream", trainable=())
    quantize_backbone(model, skip=("head", "blocks.1.mlp"))  # leaves blocks.1.mlp.fc1/fc2 dense
    inject_lora(model, targets=("qkv",), r=2, adapter_name="task", trainable=("blocks.1", "head"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.1.norm1.weight" in trainable and "head.weight" in trainable
    assert "blocks.1.attn.qkv.lora_A.task" in trainable
    assert not any(".base." in n or "upstream" in n for n in trainable), sorted(trainable)


def snapshot(model):
    """Everything a failed call must leave as it was: module types, tensors and trainable flags."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_same(model, snap):
    types, state, flags = snapshot(model)
    assert types == snap[0] and flags == snap[2]
    assert state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(), "already has an adapter named 'default'"),  # a second call with the same name
    (dict(adapter_name="task", rank_pattern={"fc2": 0}), r"blocks\.0\.mlp\.fc2.*r=0"),
    (dict(adapter_name="task", alpha_pattern={"attn.proj": -1.0}), "alpha=-1"),
    (dict(adapter_name="task", targets="blocks.(qkv"), r"targets='blocks.\(qkv' is not a valid regular"),
    (dict(adapter_name="task", exclude="[x"), r"exclude='\[x'"),
    (dict(adapter_name="task", trainable="*head"), r"trainable='\*head'"),
    (dict(adapter_name="task", rank_pattern={"(fc": 2}), r"rank_pattern key='\(fc'"),
    (dict(adapter_name="a.b"), "adapter name"),
])
def test_failed_inject_leaves_the_model_exactly_as_it_was(kwargs, needle):
    model = tiny_vit()
    inject_lora(model, r=2, backend="torch")
    model.blocks[0].norm1.weight.requires_grad_(True)  # a user's own choice, kept on failure
    snap = snapshot(model)
    with pytest.raises(ValueError, match=needle):
        inject_lora(model, backend="torch", **kwargs)
    assert_same(model, snap)


def test_failed_quantize_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no float linear layer"):
        quantize_backbone(model, skip=("0",))
    assert_same(model, snap)


def test_classifier_from_timm_metadata_for_quantize_and_inject():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=32,
                              window_size=2, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1))
    # an explicit "head" covers the head's subtree: head.fc stays float (it was quantized before)
    quantize_backbone(model, skip=("head",))
    assert type(model.head.fc) is nn.Linear
    inject_lora(model, backend="torch")  # trainable=None: head.fc from pretrained_cfg["classifier"]
    assert model.head.fc.weight.requires_grad and model.head.fc.bias.requires_grad
    with pytest.warns(UserWarning, match=r"trainable=\('classifier',\) matches no module"):
        inject_lora(model, backend="torch", adapter_name="b", trainable=("classifier",))
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3,
                                  img_size=32, patch_size=8, depth=1)
    inject_lora(distilled, backend="torch")
    assert distilled.head.weight.requires_grad and distilled.head_dist.weight.requires_grad


def test_inject_reports_projections_it_did_not_adapt():
    model = tiny_vit()
    summary = inject_lora(model, targets=("qkv",), backend="torch")
    assert summary.missed == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.proj", "mlp.fc1", "mlp.fc2")]
    assert "not adapted: ['blocks.0.attn.proj'" in str(summary)


def test_code_reading_weight_gets_the_dequantized_int8_weight():
    class ReadsWeight(nn.Module):  # timm's EVA/BEiT: F.linear(x, self.qkv.weight, bias)
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 6)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)

    torch.manual_seed(0)
    model = ReadsWeight()
    quantize_backbone(model, skip=())
    q = model.qkv
    x = torch.randn(3, 8)
    W = q.CB.float() * q.SCB[:, None] / 127
    torch.testing.assert_close(model(x), torch.nn.functional.linear(x, W, q.bias))
    torch.testing.assert_close(model(x), q(x))


def test_int8_weight_follows_the_model_dtype():
    model = nn.Sequential(nn.Linear(8, 6, bias=False))  # no bias to take the dtype from (EVA's qkv)
    quantize_backbone(model, skip=())
    assert model[0].weight.dtype == torch.float32
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].CB.dtype == torch.int8
    model.double()
    layer = LoRALinear(model[0], r=2, backend="torch")
    assert layer.lora_A["default"].dtype == torch.float64 and layer.weight.dtype == torch.float64

"""PEFT format in both directions with the real peft package, and LoRALinear == peft's LoRA layer."""
import json

import pytest
import timm
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

peft = pytest.importorskip("peft")

from fastfair import LoRALinear, inject_lora, load_adapter, lora_layers, save_adapter  # noqa: E402


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                             patch_size=8, depth=2)


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.adapters:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.2)


@given(st.integers(1, 32), st.integers(1, 32), st.integers(1, 16), st.floats(1, 32), st.booleans())
def test_same_output_and_grads_as_peft_layer(k, n, r, alpha, rslora):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("lin", nn.Linear(k, n))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_rslora=rslora)
    pm = peft.get_peft_model(net, cfg)
    plin = pm.base_model.model.lin
    with torch.no_grad():
        plin.lora_B["default"].weight.normal_()
    ours = LoRALinear(nn.Linear(k, n), r=r, alpha=alpha, use_rslora=rslora, backend="torch")
    with torch.no_grad():
        ours.base.weight.copy_(plin.base_layer.weight)
        ours.base.bias.copy_(plin.base_layer.bias)
        ours.lora_A["default"].copy_(plin.lora_A["default"].weight)
        ours.lora_B["default"].copy_(plin.lora_B["default"].weight)
    x1 = torch.randn(2, 3, k, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), pm(x2)
    # fp32 rounding only: the CPU path merges W + s·B·A (fastfair.ops.lora, design "merged"), which
    # sums in another order than peft's x·Aᵀ·Bᵀ·s; float64 agreement is tested in test_dispatch.
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y1, y2, **tol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(ours.lora_A["default"].grad, plin.lora_A["default"].weight.grad, **tol)
    torch.testing.assert_close(ours.lora_B["default"].grad, plin.lora_B["default"].weight.grad, **tol)


def test_fastfair_to_peft(tmp_path):
    model = tiny_vit()
    inject_lora(model, r=4, alpha=8, rank_pattern={"blocks.1.mlp.fc2": 6}, backend="torch")
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"blocks.1.mlp.fc2": 6}
    assert cfg["modules_to_save"] == ["head"]
    base = tiny_vit()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(pm(x), y, rtol=1e-5, atol=1e-5)


def test_peft_to_fastfair_and_frozen_beside_task_adapter(tmp_path):
    base = tiny_vit()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"])
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.2)
    pm.eval()
    x = torch.randn(2, 3, 32, 32)
    y = pm(x)
    pm.save_pretrained(str(tmp_path))
    model = tiny_vit()
    loaded = load_adapter(model, tmp_path, name="upstream", trainable=False, backend="torch")
    assert sorted(loaded) == sorted(f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1"))
    model.eval()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    upstream = {n: p.detach().clone() for n, p in model.named_parameters() if "upstream" in n}
    # a trainable task adapter beside the frozen upstream one; the upstream never changes
    inject_lora(model, r=2, adapter_name="task", backend="torch")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "upstream" in n)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if "upstream" in n:
            assert torch.equal(p, upstream[n]), n
    assert model.blocks[0].attn.qkv.lora_B["task"].abs().sum() > 0


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json not found"):
        load_adapter(tiny_vit(), tmp_path)
    model = tiny_vit()
    inject_lora(model, r=4)
    save_adapter(model, tmp_path)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                              patch_size=8, depth=2, embed_dim=96, num_heads=3)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 192\)"):
        load_adapter(other, tmp_path)
    shallow = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                                patch_size=8, depth=1)
    with pytest.raises(ValueError, match="'blocks.1.attn.proj' matches no linear layer"):
        load_adapter(shallow, tmp_path)


def test_rank_and_alpha_patterns_read_as_peft_reads_them(tmp_path):
    # peft matches a pattern key as a regex at the end of the name: (.*\.)?key
    patterns = dict(rank_pattern={r"blocks\.1\.attn\.qkv": 6}, alpha_pattern={r"attn\.(qkv|proj)": 32.0})
    base = tiny_vit()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "attn.proj", "fc1"],
                                                   **patterns))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    x = torch.randn(2, 3, 32, 32)
    y = pm(x)
    pm.save_pretrained(str(tmp_path))
    model = tiny_vit()
    load_adapter(model, tmp_path, backend="torch")
    model.eval()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    ours = tiny_vit()
    inject_lora(ours, targets=["qkv", "attn.proj", "fc1"], r=4, alpha=8, **patterns)
    scales = {n: (m.adapters["default"].r, m.adapters["default"].scale) for n, m in lora_layers(ours).items()}
    theirs = {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
              for n, m in pm.named_modules() if hasattr(m, "scaling")}
    assert scales == theirs


def test_save_refuses_trainable_parameters_it_would_drop(tmp_path):
    model = tiny_vit()
    inject_lora(model, r=2, backend="torch")
    model.cls_token.requires_grad_(True)  # a root parameter: no module to list in modules_to_save
    with pytest.raises(ValueError, match="cls_token"):
        save_adapter(model, tmp_path)
    model.cls_token.requires_grad_(False)
    model.blocks[0].attn.qkv.base.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.base"):
        save_adapter(model, tmp_path)
    model.blocks[0].attn.qkv.base.weight.requires_grad_(False)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["head"]

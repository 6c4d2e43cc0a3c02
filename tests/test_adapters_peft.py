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
    with pytest.raises(ValueError, match="'blocks.1.attn.proj' matches no Linear or Conv2d layer"):
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


def test_readme_targets_wrap_the_patch_embedding_as_peft_does_both_ways(tmp_path):
    # peft matches 'proj' by suffix and also wraps the patch_embed.proj Conv2d
    x = torch.randn(2, 3, 32, 32)
    pm = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    y = pm.eval()(x)
    pm.save_pretrained(str(tmp_path / "theirs"))
    model = tiny_vit()
    assert "patch_embed.proj" in load_adapter(model, tmp_path / "theirs", backend="torch")
    torch.testing.assert_close(model.eval()(x), y, rtol=1e-5, atol=1e-5)
    ours = tiny_vit()
    inject_lora(ours, targets=["qkv", "proj", "fc1", "fc2"], r=4, alpha=8, backend="torch")
    assert "patch_embed.proj" in lora_layers(ours)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["target_modules"] == ["fc1", "fc2", "proj", "qkv"]
    back = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


def test_load_into_an_existing_adapter_replaces_it_and_a_failed_load_changes_nothing(tmp_path):
    src = tiny_vit()
    inject_lora(src, r=4, backend="torch")
    randomize_lora(src, seed=5)
    save_adapter(src, tmp_path / "a")
    model = tiny_vit()
    inject_lora(model, r=4, alpha=2, backend="torch")  # same name and shapes, other weights
    load_adapter(model, tmp_path / "a", trainable=True, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), src.eval()(x))
    assert model.blocks[0].attn.qkv.adapters["default"].alpha == 16  # the file's settings too
    # a shape mismatch names the layer and both shapes, and nothing was loaded before it
    wide = tiny_vit()
    inject_lora(wide, r=8, backend="torch")
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj\.lora_A has shape \(4, 192\), the layer needs \(8, 192\)"):
        load_adapter(wide, tmp_path / "a", backend="torch")
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())
    shallow = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                                patch_size=8, depth=1)
    with pytest.raises(ValueError, match="blocks.1"):
        load_adapter(shallow, tmp_path / "a")
    assert not lora_layers(shallow)  # blocks.0 was not wrapped before blocks.1 failed


def test_heads_saved_whole_with_their_buffers(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=3, img_size=32, embed_dim=(16, 32),
                              key_dim=8, num_heads=(2, 2), depth=(1, 1))
    inject_lora(model, backend="torch")  # LeViT's heads are BatchNorm + Linear
    model.eval()
    model.head.train(), model.head_dist.train()
    model(torch.randn(4, 3, 32, 32))  # moves the heads' running statistics (only theirs)
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.head.bn.running_mean", "base_model.model.head_dist.bn.running_var"} <= set(keys)
    torch.manual_seed(0)  # the same backbone, with the heads' initial statistics
    fresh = timm.create_model("levit_128s", pretrained=False, num_classes=3, img_size=32, embed_dim=(16, 32),
                              key_dim=8, num_heads=(2, 2), depth=(1, 1))
    load_adapter(fresh, tmp_path, backend="torch")
    torch.testing.assert_close(fresh.head.bn.running_mean, model.head.bn.running_mean)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_several_adapters_in_peft_layout_with_the_head_once(tmp_path):
    model = tiny_vit()
    inject_lora(model, r=2, backend="torch")
    inject_lora(model, targets=["qkv"], r=3, adapter_name="task", backend="torch")
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    for layer in lora_layers(model).values():
        layer.set_active(list(layer.adapters))
    save_adapter(model, tmp_path, ["default", "task"])
    cfgs = [json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path, tmp_path / "task")]
    assert cfgs[0]["modules_to_save"] == ["head"] and cfgs[1]["modules_to_save"] is None
    x = torch.randn(2, 3, 32, 32)
    y = model.eval()(x)
    pm = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path))
    pm.load_adapter(str(tmp_path / "task"), adapter_name="task")
    pm.base_model.set_adapter(["default", "task"])
    torch.testing.assert_close(pm.eval()(x), y, rtol=1e-5, atol=1e-5)
    assert (tiny_vit().eval()(x) - y).abs().max() > 1e-3

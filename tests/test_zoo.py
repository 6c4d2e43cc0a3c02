"""inject_lora / quantize_backbone defaults on the timm zoo, and exchange with peft where peft computes the same.

Every model is built tiny (pretrained=False, one or two blocks, narrow, a small input each
accepts), so the whole matrix (79 cases) ran in 19 s wall on two idle CPU cores, imports included.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from fastfair import inject_lora, load_adapter, lora_layers, quantize_backbone, save_adapter
from fastfair.families import classifier_names
from fastfair.inject import under
from fastfair.int8 import Int8Linear

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SWIN = dict(img_size=32, window_size=2, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1))
# name -> (constructor overrides, input size): small sizes each constructor accepts
ZOO = {
    "vit_tiny_patch16_224": (VIT, 32),
    "deit_tiny_distilled_patch16_224": (VIT, 32),
    "deit3_small_patch16_224": (VIT, 32),
    "eva02_tiny_patch14_224": (dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28),
    "beit_base_patch16_224": (VIT, 32),
    "vit_small_patch14_dinov2": (dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28),
    "vit_base_patch16_clip_224": (VIT, 32),
    "vit_base_patch16_siglip_224": (VIT, 32),
    "swin_tiny_patch4_window7_224": (SWIN, 32),
    "swinv2_tiny_window8_256": (SWIN, 32),
    "convnext_atto": (dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)), 32),
    "convnext_tiny": (dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)), 32),  # linear MLP, unlike atto
    "mixer_s16_224": (dict(img_size=32, num_blocks=2, embed_dim=32), 32),
    "resmlp_12_224": (dict(img_size=32, num_blocks=2, embed_dim=32), 32),
    "pit_ti_224": (dict(img_size=32, patch_size=8, stride=4, base_dims=(16, 16), depth=(1, 1), heads=(1, 2)), 32),
    "xcit_nano_12_p16_224": (dict(img_size=32, depth=1, embed_dim=32, num_heads=2), 32),
    "cait_xxs24_224": (dict(img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32, num_heads=2), 32),
    "maxvit_nano_rw_256": (dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=(32, 32, 32, 32),
                                stem_width=(8, 32)), 64),
    "coat_lite_tiny": (dict(img_size=32, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1)), 32),
    "levit_128s": (dict(img_size=32, embed_dim=(16, 32), key_dim=8, num_heads=(2, 2), depth=(1, 1)), 32),
    "hiera_tiny_224": (dict(img_size=64, embed_dim=16, stages=(1, 1, 1, 1)), 64),
    "fastvit_t8": (dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16)), 32),
    "efficientformer_l1": (dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16)), 224),
    "twins_pcpvt_small": (dict(img_size=32, depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16),
                               num_heads=(1, 1, 1, 1)), 32),
    "twins_svt_small": (dict(img_size=32, depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16),
                             num_heads=(1, 1, 1, 1)), 32),
    "crossvit_tiny_240": (dict(img_size=48, img_scale=(1.0, 1.0), depth=((1, 1, 1),), embed_dim=(16, 16),
                               num_heads=(1, 1)), 48),
    "samvit_base_patch16": (dict(img_size=64, depth=2, embed_dim=32, num_heads=2, global_attn_indexes=(1,),
                                 window_size=2), 64),
}
# timm calls F.linear(x, self.qkv.weight, ...) here: peft's LoRA on qkv does nothing, so only
# fastfair's own behaviour is tested (its .weight carries the adapter)
PEFT_IGNORES_QKV = {"eva02_tiny_patch14_224", "beit_base_patch16_224", "swinv2_tiny_window8_256"}


# projections the family tables leave out on purpose (docs/families.md), which inject_lora reports:
# CaiT's talking-heads mixing, SwinV2's continuous position-bias MLP
REPORTED = {"proj_l", "proj_w", "0", "2"}


def make(name, dtype=torch.float32, seed=0):
    kw, size = ZOO[name]
    torch.manual_seed(seed)
    if name.startswith(("mixer", "resmlp")):  # their entry points fix num_blocks and embed_dim
        from timm.models.mlp_mixer import Affine, ResBlock, _create_mixer

        extra = dict(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4) if name.startswith("resmlp") else {}
        model = _create_mixer(name, pretrained=False, num_classes=3, patch_size=16, **kw, **extra)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=3, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # timm zero-inits some heads: give them weights so the output moves
        for c in classifier_names(model):
            for p in model.get_submodule(c).parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        # layer scales start at 1e-6 and SwinV2's post-norms at 0, which hides what LoRA does
        for n, p in model.named_parameters():
            if p.numel() == p.shape[0] and not n.endswith("bias") and p.abs().max() < 1e-3:
                p.fill_(1.0)
    return model.to(dtype), torch.randn(2, 3, size, size, generator=g, dtype=dtype)


def randomize_B(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * 0.1)


def classifier_params(model):
    return {f"{c}.{n}" for c in classifier_names(model) for n, _ in model.get_submodule(c).named_parameters()}


@pytest.mark.parametrize("name", list(ZOO))
def test_defaults_adapt_and_train_only_adapters_and_classifier(name):
    model, x = make(name)
    summary = inject_lora(model, backend="torch")
    assert summary.wrapped and all(m.rsplit(".", 1)[-1] in REPORTED for m in summary.missed), summary.missed
    model.eval()
    y0 = model(x)
    randomize_B(model)
    assert (model(x) - y0).abs().max() > 1e-4  # LoRA changes the output once B is nonzero
    model.train()
    model(x).square().mean().backward()
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    head = classifier_params(model)
    assert head and len(lora) == 2 * len(summary.wrapped)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == lora | head


@pytest.mark.parametrize("name", list(ZOO))
def test_int8_backbone_with_lora_keeps_the_classifier_float_and_trainable(name):
    model, x = make(name)
    heads = classifier_names(model)
    if not any(isinstance(m, nn.Linear) and not under(n, heads) for n, m in model.named_modules()):
        with pytest.raises(ValueError, match="no float linear layer"):  # all-conv: FastViT, ConvNeXt-atto
            quantize_backbone(model)
        return
    quantize_backbone(model)
    inject_lora(model, backend="torch")
    head = classifier_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head <= trainable
    for c in classifier_names(model):
        assert not any(isinstance(m, Int8Linear) for m in model.get_submodule(c).modules())
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    for mode in ("eval", "train"):
        getattr(model, mode)()
        y = model(x)
        assert y.shape == (2, 3) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(model.get_parameter(n).grad is not None for n in head)


def peft_pair(name, tmp_path):
    """The same float64 model adapted by fastfair and by peft with the same targets and weights."""
    peft = pytest.importorskip("peft")
    ours, x = make(name, torch.float64)
    theirs = copy.deepcopy(ours)
    inject_lora(ours, backend="torch")
    randomize_B(ours)
    with torch.no_grad():
        for c in classifier_names(ours):
            for p in ours.get_submodule(c).parameters():
                p.add_(0.1)
    save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "ours"))  # fastfair -> peft
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(lora_layers(ours))  # peft adapts exactly the layers fastfair did
    return ours, pm, x


@pytest.mark.parametrize("name", [n for n in ZOO if n not in PEFT_IGNORES_QKV])
def test_same_function_as_peft_and_adapters_both_ways(name, tmp_path):
    ours, pm, x = peft_pair(name, tmp_path)
    ours.eval(), pm.eval()
    y = ours(x)
    torch.testing.assert_close(pm(x), y, rtol=1e-10, atol=1e-10)
    pm.save_pretrained(str(tmp_path / "theirs"))  # peft -> fastfair, into a fresh model
    fresh, _ = make(name, torch.float64)
    load_adapter(fresh, tmp_path / "theirs", backend="torch")
    torch.testing.assert_close(fresh.eval()(x), y, rtol=1e-10, atol=1e-10)


def test_resnet_is_refused_politely_and_left_unchanged():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, layers=(1, 1, 1, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="ResNet.*no attention or MLP projection.*targets="):
        inject_lora(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert classifier_names(model) == ["fc"]

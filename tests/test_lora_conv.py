"""LoRAConv2d (peft's convolution LoRA) against peft's own layer, and its merged kernel."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfair.lora_conv import LoRAConv2d

peft = pytest.importorskip("peft")


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 6), st.booleans(), st.booleans())
def test_same_output_grads_and_merge_as_peft_conv_lora(cin, cout, k, stride, pad, r, bias, rslora):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, bias=bias).double())
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["conv"], use_rslora=rslora)
    theirs = peft.get_peft_model(net, cfg).base_model.model.conv
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
    ours = LoRAConv2d(nn.Conv2d(cin, cout, k, stride, pad, bias=bias).double(), r=r, alpha=2 * r + 1,
                      use_rslora=rslora)
    with torch.no_grad():
        ours.base.load_state_dict(theirs.base_layer.state_dict())
        ours.lora_A["default"].copy_(theirs.lora_A["default"].weight)  # same shapes as peft's
        ours.lora_B["default"].copy_(theirs.lora_B["default"].weight)
    x1 = torch.randn(2, cin, 7, 6, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.lora_A["default"].grad, theirs.lora_A["default"].weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.lora_B["default"].grad, theirs.lora_B["default"].weight.grad, rtol=1e-12, atol=1e-12)
    # the effective kernel is the whole function, and merging folds exactly it into the base
    conv = dict(stride=ours.stride, padding=ours.padding)
    torch.testing.assert_close(F.conv2d(x1, ours.weight, ours.bias, **conv), y1, rtol=1e-12, atol=1e-12)
    ours.merge()
    torch.testing.assert_close(ours(x1), y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.base(x1), y1, rtol=1e-12, atol=1e-12)


def test_refuses_what_peft_would_compute_differently():
    for kw in (dict(groups=2), dict(dilation=2), dict(padding_mode="reflect", padding=1)):
        with pytest.raises(ValueError, match=str(list(kw.values())[0])):
            LoRAConv2d(nn.Conv2d(4, 4, 3, **kw))
    with pytest.raises(TypeError, match="int64"):
        LoRAConv2d(nn.Conv2d(2, 2, 1))(torch.ones(1, 2, 3, 3, dtype=torch.long))

"""End-to-end training step: fastfair against timm + HF peft, the frozen floor and full fine-tuning.

One optimizer step of a ViT with LoRA r=16 on qkv/proj/fc1/fc2 and the FairLoRA loss
(mean CE + lam·variance of group mean CE), for:

  peft      timm + HF peft LoRA + PyTorch cross-entropy, scatter_add and variance
  fastfair  fastfair LoRALinear + FairnessLoss (Triton kernels on CUDA)
  ff_int8   fastfair with an int8 (bitsandbytes) frozen backbone
  floor     the frozen backbone without LoRA, back-propagating to a trainable patch embedding:
            every layer's input gradient and nothing else, the least a LoRA step can cost
  full      full fine-tuning of the same model

  python bench/train_step.py                 # CUDA: ViT-B/16, 224², batch 128 and 256, bf16
  python bench/train_step.py --device cpu    # CPU: ViT-S/8 at 64², batch 32, fp32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, peak_memory_mb, time_ms, write_results  # noqa: E402

from fastfair import FairnessLoss, inject_lora, quantize_backbone  # noqa: E402

TARGETS = ["qkv", "proj", "fc1", "fc2"]
NUM_CLASSES, NUM_GROUPS, LAM, RANK = 10, 8, 1.0, 16


def reference_loss(logits, labels, groups):
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    gsum = torch.zeros(NUM_GROUPS, device=ce.device).scatter_add(0, groups, ce)
    gcnt = torch.zeros(NUM_GROUPS, device=ce.device).scatter_add(0, groups, torch.ones_like(ce))
    present = gcnt > 0
    means = gsum[present] / gcnt[present]
    return ce.mean() + LAM * means.var(unbiased=False)


def build(kind: str, model_name: str, model_kw: dict, device):
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES, **model_kw)
    loss = reference_loss
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        # patch_embed.proj is a conv that a bare 'proj' suffix would also catch in peft
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and n.rsplit(".", 1)[-1] in TARGETS]
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=names,
                                                 modules_to_save=["head"]))
    elif kind in ("fastfair", "ff_int8"):
        inject_lora(model, targets=TARGETS, r=RANK, alpha=2 * RANK)
        if kind == "ff_int8":
            quantize_backbone(model)
        loss = FairnessLoss(NUM_GROUPS, lam=LAM)
    elif kind == "floor":
        model.requires_grad_(False)
        model.patch_embed.requires_grad_(True)
        model.head.requires_grad_(True)
    elif kind != "full":
        raise ValueError(kind)
    model = model.to(device)
    if isinstance(loss, torch.nn.Module):
        loss = loss.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, loss, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kinds", default="peft,fastfair,ff_int8,floor,full")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        model_name, model_kw, batches, dtype = "vit_base_patch16_224", {}, (128, 256), torch.bfloat16
    else:
        model_name, model_kw, batches, dtype = "vit_small_patch16_224", dict(img_size=64, patch_size=8), (32,), None
    env = environment(device)
    rows = []
    for batch in batches:
        size = model_kw.get("img_size", 224)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        g = torch.randint(0, NUM_GROUPS, (batch,), device=device)
        results = {}
        for kind in args.kinds.split(","):
            model, loss_fn, opt, n_train = build(kind, model_name, model_kw, device)

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = model(x)
                out = loss_fn(logits.float(), y, g)
                (out.loss if hasattr(out, "loss") else out).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = time_ms(step, device, warmup=2, rep=5)
            results[kind] = dict(batch=batch, kind=kind, ms=ms, images_per_s=batch / ms * 1e3,
                                 peak_mb=peak_memory_mb(step, device), trainable=n_train)

        for r in results.values():
            for base in ("peft", "floor", "full"):
                if base in results:
                    r[f"time/{base}"] = r["ms"] / results[base]["ms"]
            rows.append(r)
    name = f"{model_name}{'-' + str(model_kw['img_size']) if model_kw else ''}"
    md = write_results("train_step", env, rows,
                       ["batch", "kind", "ms", "images_per_s", "peak_mb", "trainable", "time/peft",
                        "time/floor", "time/full"],
                       notes=f"{name}, LoRA r={RANK} on {TARGETS}, FairLoRA loss (lam={LAM}), AdamW; "
                             f"time/X = step time relative to X in the same run.")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

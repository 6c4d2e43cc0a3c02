"""End-to-end training step: fastfair against timm + HF peft, the frozen floor and full fine-tuning.

One optimizer step of a ViT with LoRA r=16 on qkv/proj/fc1/fc2 and the FairLoRA loss
(mean CE + lam·variance of group mean CE), for:

  peft      timm + HF peft LoRA + PyTorch cross-entropy, scatter_add and variance
  fastfair  fastfair LoRALinear + FairnessLoss (Triton kernels on CUDA)
  ff_int8   fastfair with an int8 (bitsandbytes) frozen backbone
  floor     the frozen backbone without LoRA, back-propagating to a trainable patch embedding:
            every layer's input gradient and nothing else, the least a LoRA step can cost
  full      full fine-tuning of the same model

  python bench/train_step.py                 # CUDA: ViT-B/16, 224², batch 256 and 128, bf16
  python bench/train_step.py --device cpu    # CPU: ViT-S/8 at 64², batch 32, fp32, 5 rounds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Benchmark, Case, Timing, run_benchmarks  # noqa: E402

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
        # the same layers as peft's: the bare 'proj' would also catch the patch-embedding conv
        inject_lora(model, targets=TARGETS, r=RANK, alpha=2 * RANK, exclude=("patch_embed.proj",))
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


def _inputs(shape, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, size = shape["batch"], shape["img"]
    return (torch.randn(b, 3, size, size, generator=gen).to(device),
            torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device),
            torch.randint(0, NUM_GROUPS, (b,), generator=gen).to(device))


def _setup(kind: str):
    def setup(shape, inputs, device) -> Case:
        kw = {k: shape[k] for k in ("img_size", "patch_size", "depth") if shape.get(k)}
        model, loss_fn, opt, n_train = build(kind, shape["model"], kw, device)
        x, y, g = inputs
        dtype = torch.bfloat16 if device.type == "cuda" else None

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            out = loss_fn(logits.float(), y, g)
            (out.loss if hasattr(out, "loss") else out).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return Case(step, note=f"{n_train} trainable")
    return setup


SHAPES = {  # what runs where: the CPU comparison of issue 16, the GPU one at ViT-B
    "cuda": [dict(model="vit_base_patch16_224", img=224, img_size=None, patch_size=None, batch=b)
             for b in (256, 128)],
    "cpu": [dict(model="vit_small_patch16_224", img=64, img_size=64, patch_size=8, batch=32)],
    "smoke": [dict(model="test_vit", img=32, img_size=32, patch_size=16, batch=4)],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kinds", default=None, help="comma-separated; default: every kind on CUDA, "
                                                 "peft,fastfair,floor on the CPU")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds (ratio spread)")
    ap.add_argument("--reps", type=int, default=3, help="CPU: timed steps per kind per round")
    ap.add_argument("--smoke", action="store_true", help="a toy model, one round: the script runs")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    kinds = args.kinds or ("peft,fastfair,ff_int8,floor,full" if device.type == "cuda" else "peft,fastfair,floor")
    shapes = SHAPES["smoke" if args.smoke else device.type]
    rerun = (sys.executable, __file__, *(sys.argv[1:] if argv is None else argv))
    timing = (Timing(warmup_ms=100, rep_ms=500) if device.type == "cuda"
              else Timing(cpu_warmup=1 if args.smoke else 2, cpu_reps=1 if args.smoke else args.reps,
                          rounds=1 if args.smoke else args.rounds, isolate=() if args.smoke else rerun))
    bench = Benchmark(
        "train_step", shapes, {k: _setup(k) for k in kinds.split(",")}, ("peft", "floor", "full"),
        modes=("full", "memory"), make_inputs=_inputs,
        notes=(f"One optimizer step: LoRA r={RANK} on {TARGETS}, FairLoRA loss (lam={LAM}), AdamW. "
               "x_<b> = step time / b's step time; on the CPU the providers are interleaved in "
               "rounds and the ratio is the median over rounds, with its range over rounds."))
    md = run_benchmarks(bench, device, timing=timing, budget_s=args.budget_s, results_dir=args.results_dir)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmark: one LoRA linear layer, fastfair against what a user would run instead.

``python bench/lora_linear.py`` on CUDA: ViT-B/16 and ViT-L/14 layer shapes (qkv, proj, fc1, fc2;
M = batch × 197 tokens), batch 256, r ∈ {8, 16, 64}, dropout 0 and 0.1, a bf16 base and an int8
base, forward and forward+backward, eager and under CUDA graphs. Providers in the same run:

  linear           frozen ``nn.Linear`` (input gradient only): the floor
  peft             HF peft's LoRA ``Linear``, eager
  peft_compile     the same under ``torch.compile`` (what peft users do today, peft#1199)
  unsloth          the cuBLAS chain: ``x·Wᵀ``, then ``addmm`` of ``(x·Aᵀ)·Bᵀ``, and likewise back
  bnb_peft         bitsandbytes ``Linear8bitLt`` + peft (int8 base)
  unsloth_int8     dequantize the int8 weight, then the cuBLAS chain
  fastfair         ``LoRALinear`` as shipped: the dispatcher picks the design
  fastfair[<d>]    each design forced with ``fastfair.ops.lora.force_design`` (eager only)
  fastfair_int8    the same on the int8 base; ``fastfair_int8[<d>+<int8 mode>]`` forced

Shapes are ordered most important first (ViT-B, batch 256, r = 16: the issue's targets), so a
run stopped by ``--budget-s`` has measured what matters. ``lora_overhead`` is the per-layer host
(Python + launch) cost at a tiny shape: the row the "≤ 40 µs forward" target reads.

On the CPU it runs toy shapes through the PyTorch reference path (``torch.compile`` with the
``eager`` backend), only so the script cannot rot: those numbers say nothing of kernel speed.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RUNNERS, Benchmark, Case, NotApplicable, Timing, run_benchmarks  # noqa: E402

from fastfair.int8 import Int8Weight, dense_weight  # noqa: E402
from fastfair.lora import LoRALinear  # noqa: E402

MODELS = {  # name: [(layer, in K, out N)]
    "vit_b16": [("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)],
    "vit_l14": [("qkv", 1024, 3072), ("proj", 1024, 1024), ("fc1", 1024, 4096), ("fc2", 4096, 1024)],
}
TOKENS = 197
# issue 16's targets (H100/H200, bf16, ViT-B batch 256, r = 16): the largest allowed time ratio
TARGETS = {
    ("fastfair", "forward", "x_linear", 0.0): 1.10,
    ("fastfair", "full", "x_linear", 0.0): 1.15,
    ("fastfair", "full", "x_linear", 0.1): 1.30,
    ("fastfair", "full", "x_peft", None): 1 / 1.5,
    ("fastfair", "full", "x_peft_compile", None): 1 / 1.2,
    ("fastfair_int8", "full", "x_fastfair", None): 1.2,
    ("fastfair_int8", "full", "x_bnb_peft", None): 1 / 3.0,
}
BASELINES = ("linear", "peft", "peft_compile", "bnb_peft", "fastfair")


# -- the op's design switch: fastfair.ops.lora's force_design / design_for (no global assigned) --
def forced_designs(device) -> list[tuple[str, str | None]]:
    """Every (design, int8 mode) that can run on ``device`` at some shape (the op says which):
    int8 mode None is the dense base. At a given shape a set-up may still find it not applicable."""
    from fastfair.ops.lora import DESIGNS, INT8_MODES
    from fastfair.ops.lora_design import why_not

    probe = dict(M=256, K=64, N=64, r=8, p=0.0)
    pairs = [(d, None) for d in DESIGNS] + [(d, m) for d in DESIGNS for m in INT8_MODES]
    return [(d, m) for d, m in pairs if why_not(d, _problem(probe, device, m is not None), m) is None]


def _problem(s: dict, device, int8: bool):
    from fastfair.ops.lora_design import Problem

    return Problem(s["M"], s["K"], s["N"], s["r"], _dtype(device), s["p"] > 0, int8, device.type)


def chosen(s: dict, device) -> str:
    """What the dispatcher runs at shape ``s`` (dense, int8), and how it decided."""
    from fastfair.ops.lora import design_for

    out = []
    for int8 in (False, True):
        c = design_for(s["M"], s["K"], s["N"], s["r"], dtype=_dtype(device), dropout=s["p"] > 0,
                       int8=int8, device=device)
        out.append(f"{'int8' if int8 else 'bf16'} {c.design}{'+' + c.int8 if c.int8 else ''} ({c.source})")
    return ", ".join(out)


# -- providers ---------------------------------------------------------------------------------------
class One(nn.Module):
    """A one-layer model so peft can target the layer by name."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft(base: nn.Module, s: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(One(base), LoraConfig(r=s["r"], lora_alpha=2 * s["r"], lora_dropout=s["p"],
                                                target_modules=["proj"]))


def _dense_linear(s, device, dtype):
    torch.manual_seed(0)
    return nn.Linear(s["K"], s["N"], device=device, dtype=dtype).requires_grad_(False)


def _int8_linear(s, device):
    # bitsandbytes' own layer: peft adapts only that one, and fastfair takes it over as it is
    from fastfair.int8 import bnb_linear8bit

    return bnb_linear8bit(_dense_linear(s, device, torch.float32))


def _case(layer: nn.Module, x: torch.Tensor, **kw) -> Case:
    params = [p for p in layer.parameters() if p.requires_grad]
    return Case(lambda: layer(x), [x, *params], **kw)


class CublasChain(torch.autograd.Function):
    """unsloth's ``LoRA_W``: every product a cuBLAS call, the low-rank term added by ``addmm``.

    Forward ``y = x·Wᵀ (+b); y += s·(xd·Aᵀ)·Bᵀ`` with ``xd`` the dropped-out x; backward
    ``dX = dY·W + s·((dY·B)·A)⊙mask/(1-p)``, ``dA = s·(dY·B)ᵀ·xd``, ``dB = s·dYᵀ·(xd·Aᵀ)``.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, p):
        x2 = x.reshape(-1, x.shape[-1])
        keep = (torch.rand_like(x2) >= p) if p > 0 else None
        xd = x2 * keep / (1 - p) if p > 0 else x2
        xa = xd @ A.t()
        y = x2 @ W.t() if b is None else torch.addmm(b, x2, W.t())
        y.addmm_(xa, B.t(), alpha=s)
        ctx.save_for_backward(W, A, B, xd, xa, keep)
        ctx.s, ctx.p, ctx.shape = s, p, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        W, A, B, xd, xa, keep = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        g = dy @ B
        if keep is None:
            dx = (dy @ W).addmm_(g, A, alpha=ctx.s)
        else:
            dx = (dy @ W).add_((g @ A) * keep, alpha=ctx.s / (1 - ctx.p))
        dA = (g.t() @ xd).mul_(ctx.s)
        dB = (dy.t() @ xa).mul_(ctx.s)
        return dx.view(ctx.shape), None, None, dA.to(A.dtype), dB.to(B.dtype), None, None


def _unsloth(s, x, weight):
    """The cuBLAS chain on ``weight()`` (a dense weight, or an int8 one dequantized per call)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    A = (torch.randn(s["r"], s["K"], generator=gen) / s["K"] ** 0.5).to(x.device, x.dtype).requires_grad_()
    B = (torch.randn(s["N"], s["r"], generator=gen) * 0.02).to(x.device, x.dtype).requires_grad_()
    scale = 2.0
    return Case(lambda: CublasChain.apply(x, weight(), None, A, B, scale, s["p"]), [x, A, B])


def _fastfair(base: nn.Module, s: dict, x, forced=None) -> Case:
    """``LoRALinear`` on ``base``; ``forced``: a (design, int8 mode) held for every timed call."""
    if forced is not None:
        from fastfair.ops.lora import force_design
        from fastfair.ops.lora_design import why_not

        if (why := why_not(*forced[:1], _problem(s, x.device, forced[1] is not None), forced[1])) is not None:
            raise NotApplicable(why)
    layer = LoRALinear(base, r=s["r"], alpha=2 * s["r"], dropout=s["p"]).to(x.device)
    with torch.no_grad():  # nonzero B, as after a step (the timing does not depend on it)
        for B in layer.lora_B.values():
            B.normal_(0, 0.02)
    if forced is None:
        return _case(layer, x)
    # forced designs: eager only (CUDA graphs are for what ships)
    return _case(layer, x, context=lambda: force_design(*forced), runners=("eager",))


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _compiled(module: nn.Module, device):
    # Every shape's module shares one forward code object: without a reset Dynamo would stop
    # recompiling after its recompile limit and run later shapes eagerly, unannounced.
    torch._dynamo.reset()
    # On the CPU the eager backend: Dynamo's tracing is exercised without a C++ build.
    return torch.compile(module, backend="inductor" if device.type == "cuda" else "eager")


def providers(device: torch.device, designs=()) -> dict:
    """name -> setup(shape, x, device); every provider builds its own layer of the shape."""
    dt = _dtype(device)
    table = {
        "linear": lambda s, x, d: Case(lambda lin=_dense_linear(s, d, dt): lin(x), [x]),
        "peft": lambda s, x, d: _case(_peft(_dense_linear(s, d, dt), s), x),
        "peft_compile": lambda s, x, d: _case(_compiled(_peft(_dense_linear(s, d, dt), s), d), x),
        "unsloth": lambda s, x, d: _unsloth(s, x, lambda w=_dense_linear(s, d, dt).weight: w),
        "fastfair": lambda s, x, d: _fastfair(_dense_linear(s, d, dt), s, x),
        "bnb_peft": lambda s, x, d: _case(_peft(_int8_linear(s, d), s), x),
        "unsloth_int8": lambda s, x, d: _unsloth(s, x, _int8_weight(_int8_linear(s, d), x.dtype)),
        "fastfair_int8": lambda s, x, d: _fastfair(_int8_linear(s, d), s, x),
    }
    for design, mode in designs:
        if mode is None:
            table[f"fastfair[{design}]"] = lambda s, x, d, k=design: _fastfair(_dense_linear(s, d, dt), s, x, (k, None))
        else:
            table[f"fastfair_int8[{design}+{mode}]"] = (
                lambda s, x, d, k=(design, mode): _fastfair(_int8_linear(s, d), s, x, k))
    return table


def _int8_weight(q: nn.Module, dtype):
    w = Int8Weight(q.weight.CB if q.weight.CB is not None else q.state.CB,
                   q.weight.SCB if q.weight.SCB is not None else q.state.SCB)
    return lambda: dense_weight(w, dtype)


# -- shapes --------------------------------------------------------------------------------------------
def gpu_shapes(models, batches, ranks, dropouts, layers=None) -> list[dict]:
    """Every shape, the issue's target shape (ViT-B, batch 256, r = 16) first."""
    out = [dict(model=m, layer=ly, batch=b, M=b * TOKENS, K=K, N=N, r=r, p=p)
           for m in models for ly, K, N in MODELS[m] for b in batches for r in ranks for p in dropouts
           if layers is None or ly in layers]
    return sorted(out, key=lambda s: (s["model"] != "vit_b16", s["batch"] != 256, s["r"] != 16, s["p"],
                                      s["r"], s["model"]))


def cpu_shapes() -> list[dict]:
    return [dict(model="toy", layer="toy", batch=2, M=2 * 40, K=64, N=96, r=8, p=p) for p in (0.0, 0.1)]


def overhead_shapes(device) -> list[dict]:
    # Tiny M: the GPU finishes each kernel long before the host issues the next, so host time is
    # what is measured. The CPU reference computes too, so its K, N are kept tiny.
    K = 768 if device.type == "cuda" else 64
    return [dict(model="overhead", layer="tiny", batch=1, M=8, K=K, N=K, r=16, p=p) for p in (0.0, 0.1)]


def _inputs(shape, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape["M"], shape["K"], device=device, dtype=_dtype(device),
                       generator=gen).requires_grad_()


# -- report --------------------------------------------------------------------------------------------
def targets_table(rows: list[dict]) -> str:
    """Each issue-16 target at ViT-B batch 256 r = 16, per layer and runner: met or missed."""
    lines = ["Targets (issue 16; ViT-B/16, batch 256, r = 16, bf16):", "",
             "| layer | runner | provider | mode | p | ratio | value | limit | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if (row.get("model"), row.get("batch"), row.get("r")) != ("vit_b16", 256, 16):
            continue
        for (prov, mode, col, p), limit in TARGETS.items():
            if (row["provider"], row["mode"]) == (prov, mode) and (p is None or row["p"] == p) and col in row:
                verdict = "met" if row[col] <= limit else "MISSED"
                lines.append(f"| {row['layer']} | {row['runner']} | {prov} | {mode} | {row['p']} | {col} "
                             f"| {row[col]:.3f} | {limit:.3f} | {verdict} |")
    return "\n".join(lines) if len(lines) > 4 else "Targets: no row at the target shape was measured."


def print_choice(shape, rows, device) -> None:
    """One line per shape: the fastest fastfair design measured here, and the dispatcher's choice."""
    best = {}
    for r in rows:
        if r["provider"].startswith("fastfair") and (r.get("mode"), r.get("runner")) == ("full", "eager") and "median" in r:
            fam = r["provider"].split("[")[0]
            if fam not in best or r["median"] < best[fam]["median"]:
                best[fam] = r
    fastest = ", ".join(f"{r['provider']} {r['median']:.3g} ms" for r in best.values())
    print(f"[lora_linear] {shape['model']} {shape['layer']} b{shape['batch']} r{shape['r']} p{shape['p']}: "
          f"fastest fwd+bwd {fastest or 'n/a'}; dispatcher: {chosen(shape, device)}", flush=True)


NOTES = ("alpha = 2r, training mode, x requires grad; forward = one forward, full = forward + "
         "the gradients of x and the trainable parameters, memory = peak CUDA memory of full above "
         "what was allocated before. x_<b> = this time / provider b's time at the same shape, mode "
         "and runner (lower is faster): x_linear against the frozen nn.Linear floor, x_fastfair on "
         "int8 rows the int8 layer against the bf16 one.")


def _timing(args, on_gpu) -> Timing:
    if on_gpu:  # short: the do_bench samples of one shape agree to a few per cent
        return Timing(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    if args.smoke:
        return Timing(cpu_warmup=1, cpu_reps=1, rounds=1, host_calls=5)
    return Timing(cpu_warmup=1, cpu_reps=args.cpu_reps, rounds=args.rounds, host_calls=50)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="*", default=[256])
    ap.add_argument("--ranks", type=int, nargs="*", default=[16, 8, 64])
    ap.add_argument("--full-ranks", type=int, nargs="*", default=[16],
                    help="ranks compared with every provider under every runner; the others get the "
                         "fastfair designs and the eager baselines only (lora_ranks), to fit a budget")
    ap.add_argument("--dropouts", type=float, nargs="*", default=[0.0, 0.1])
    ap.add_argument("--layers", nargs="*", default=None, help="a subset of qkv proj fc1 fc2")
    ap.add_argument("--providers", nargs="*", default=None, help="a subset of the provider names")
    ap.add_argument("--runners", nargs="*", default=list(RUNNERS), choices=list(RUNNERS))
    ap.add_argument("--modes", nargs="*", default=["forward", "full", "memory"])
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting shapes after this")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup-ms", type=float, default=5.0)
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=3, help="CPU: interleaved rounds per shape")
    ap.add_argument("--cpu-reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU, toy shapes, one sample: the script runs")
    return ap


RANKS_PROVIDERS = ("linear", "peft", "unsloth", "bnb_peft", "fastfair", "fastfair_int8")


def _benchmarks(args, device, table):
    """(benchmark, runners, modes, share of the budget): the full comparison at the target rank,
    the dispatch evidence at the other ranks, and the per-layer host overhead."""
    on_gpu = device.type == "cuda"
    cpu_note = "" if on_gpu else " CPU: toy shapes, reference path; says nothing of kernel speed."
    if on_gpu:
        full = gpu_shapes(args.models, args.batches, [r for r in args.ranks if r in args.full_ranks],
                          args.dropouts, args.layers)
        rest = gpu_shapes(args.models, args.batches, [r for r in args.ranks if r not in args.full_ranks],
                          args.dropouts, args.layers)
    else:
        full, rest = cpu_shapes(), []
    ranks_table = {k: v for k, v in table.items() if k.split("[")[0] in RANKS_PROVIDERS}
    over_table = {k: v for k, v in table.items() if k in ("linear", "peft", "unsloth", "fastfair")}
    out = [(Benchmark("lora_linear", full, table, BASELINES, make_inputs=_inputs, notes=NOTES + cpu_note,
                      summarize=targets_table if on_gpu else None), args.runners, args.modes, 0.65)]
    if rest:
        out.append((Benchmark("lora_ranks", rest, ranks_table, BASELINES, make_inputs=_inputs,
                              notes=NOTES + " Eager only: which design wins at each rank."),
                    ["eager"], [m for m in args.modes if m != "memory"], 0.3))
    out.append((Benchmark("lora_overhead", overhead_shapes(device), over_table, ("linear",),
                          make_inputs=_inputs, notes=OVERHEAD_NOTES + cpu_note),
                args.runners, ["host_forward", "host_full"], 0.05))
    return out


OVERHEAD_NOTES = ("Host time per layer call (µs) at a tiny shape, no synchronization inside the loop: "
                  "the Python + launch cost a GPU waits on at small batch. cuda_graph rows: one replay "
                  "of the captured call.")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device("cpu" if args.smoke else args.device)
    table = providers(device, forced_designs(device))
    if args.providers:
        table = {k: v for k, v in table.items() if k in args.providers}
    timing = _timing(args, device.type == "cuda")
    plan = _benchmarks(args, device, table)
    start = time.monotonic()
    for i, (bench, runners, modes, share) in enumerate(plan):
        budget = None  # what is left, shared in proportion among the benchmarks still to run
        if args.budget_s is not None:
            left = sum(p[3] for p in plan[i:])
            budget = max(args.budget_s - (time.monotonic() - start), 0.0) * share / left
        show = None if bench.name == "lora_overhead" else (lambda s, rows: print_choice(s, rows, device))
        md = run_benchmarks(bench, device, modes=modes, runners=runners, timing=timing, budget_s=budget,
                            results_dir=args.results_dir, on_shape=show)
        print(f"wrote {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One command that proves fastfair on one GPU: ``python bench/gpu_check.py``.

On one H100/H200, within its time budget (8 minutes by default), it runs in order:

  tests       pytest tests/gpu (the kernels against float64 references on the device)
  lora        bench/lora_linear.py: ViT-B/16 and ViT-L/14 layer shapes, batch 256, r 8/16/64,
              dropout 0 and 0.1, bf16 and int8 base, against nn.Linear, peft (eager and
              compiled), the unsloth cuBLAS chain and bitsandbytes + peft, eager and under CUDA
              graphs; it prints the design the dispatcher chose per shape, and the host overhead
  grouped_ce  bench/grouped_ce.py
  train_step  bench/train_step.py (ViT-B/16, one optimizer step)
  fsdp        the tiny trainer config trained twice, plainly and under accelerate's FSDP on the
              one GPU; the FSDP run must really be FSDP and save the same adapter

Every section runs as its own process with a hard time limit, so none can overrun the total;
the benchmarks also stop starting shapes before their limit and keep what they measured. It
writes ``bench/results/<bench>-<gpu>.{json,md}`` and ``gpu_check-<gpu>.{json,md}`` (device,
driver, versions, date, each section's outcome), and exits non-zero if a GPU test fails, a
section crashes or times out before its results, or the FSDP check fails. Missed speed targets
are results, not failures: they are in the markdown.

``--cpu-smoke`` (automatic without CUDA) runs every section at toy sizes on the CPU, so the
script cannot rot; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Python 3.11+: -P keeps the working directory off sys.path, so the installed fastfair (which has
# fastfair.kernels) is imported in every child, not the source folder of a bare clone.
PY = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


@dataclass
class Section:
    name: str
    budget_s: float  # hard limit on the GPU; the smoke run gets its own
    smoke_budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


def run_child(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd``, echoing and logging its output; (return code or None on timeout, output)."""
    print(f"$ {' '.join(cmd)}", flush=True)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        # its own process group, so a timeout also ends what it started (accelerate's workers)
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(timeout, 1))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out, rc = (out or "") + f"\n[gpu_check: killed at its {timeout:.0f} s limit]\n", None
        f.write(out)
    print(out[-4000:], flush=True)
    return rc, out


# -- sections: (ctx, section) -> fills section.status / details ------------------------------------
def tests_section(ctx, sec: Section) -> None:
    junit = ctx.results / f"gpu_tests-{ctx.tag}.xml"
    # -v: if the limit kills it, the log still says which tests passed (the XML is written at the end)
    rc, out = run_child(PY + ["-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "tests/gpu",
                              f"--junitxml={junit}"], ctx.budget(sec), ctx.log)
    summary = next((ln for ln in reversed(out.splitlines()) if " in " in ln
                    and any(w in ln for w in ("passed", "failed", "skipped", "error", "no tests"))), "")
    sec.details["summary"] = summary.strip("= ")
    if rc is None:
        sec.status = "FAILED: timed out"
    elif ctx.smoke:  # no CUDA: every GPU test skips; collecting them is the check
        sec.status = "passed (smoke: collected, skipped without CUDA)" if rc == 0 else f"FAILED: pytest rc {rc}"
    else:  # on a GPU a run where nothing ran proves nothing either
        sec.status = "passed" if rc == 0 and " passed" in summary else f"FAILED: pytest rc {rc}"


def bench_section(script: str, gpu_args: list[str], smoke_args: list[str]):
    def run(ctx, sec: Section) -> None:
        limit = ctx.budget(sec)
        args = smoke_args if ctx.smoke else gpu_args
        # the script stops starting shapes a margin before the hard limit, which kills it
        cmd = PY + [str(BENCH / script), "--results-dir", str(ctx.results),
                    "--budget-s", f"{max(limit * 0.8 - 15, 1):.0f}", *args]
        started = time.time()
        rc, out = run_child(cmd, limit, ctx.log)
        sec.details["printed"] = [ln for ln in out.splitlines() if ln.startswith(f"[{Path(script).stem}]")]
        written = sorted(p.name for p in ctx.results.glob(f"*-{ctx.tag}.json") if p.stat().st_mtime >= started)
        sec.details["results"] = written
        errors = _errors(ctx.results, written)
        sec.details.update(errors)
        if errors["fastfair_errors"]:  # fastfair failing where a baseline runs is a bug, not a number
            sec.status = f"FAILED: fastfair raised in {len(errors['fastfair_errors'])} row(s)"
        elif rc == 0:
            sec.status = "passed"
        elif rc is None:  # what it measured before the limit is on disk
            sec.status = "partial: hit its time limit" if written else "FAILED: timed out before any result"
        else:
            sec.status = f"FAILED: rc {rc}"
    return run


def _errors(results: Path, files: list[str]) -> dict:
    """Rows whose provider raised (set-up, capture or timing), fastfair's apart from the baselines'."""
    out = {"fastfair_errors": [], "baseline_errors": []}
    for name in files:
        for row in json.loads((results / name).read_text()).get("rows", []):
            note = row.get("note") or ""
            if "median" not in row and note and not note.startswith("n/a"):
                key = "fastfair_errors" if row["provider"].startswith("fastfair") else "baseline_errors"
                out[key].append(f"{name}: {row['provider']} {row.get('runner', '')} {row.get('mode', '')}: {note}")
    return out


FSDP_TOL = 1e-3  # relative L2 distance between the two adapters


def _train_config(ctx, out: Path) -> Path:
    """The tiny trainer config (the test suite's): a few steps of the tiny ViT on colored digits."""
    steps = 2 if ctx.smoke else 30
    cfg = dict(model="test_vit", img_size=16, patch_size=8, depth=2, rank=4, epochs=1, max_steps=steps,
               batch_size=16 if ctx.smoke else 64, eval_batch_size=128, repeats=1, log_with=None,
               report_ci=False, warmup_steps=1, lam=1.0, seed=0, output_dir=str(out))
    path = out.with_suffix(".json")  # JSON is YAML: the trainer's --config reads it
    path.write_text(json.dumps(cfg))
    return path


def fsdp_section(ctx, sec: Section) -> None:
    import torch
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="fastfair-fsdp-"))
    launch = PY + ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {"ACCELERATE_USE_CPU": "1"} if ctx.smoke else {}
    fsdp = ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_use_orig_params", "true"]
    # accelerate refuses FSDP without an accelerator: the smoke run compares two plain runs, which
    # exercises everything here but the FSDP flags
    runs = {"plain": [], "fsdp": [] if ctx.smoke else fsdp}
    types, deadline = {}, time.monotonic() + ctx.budget(sec)
    for name, extra in runs.items():
        cfg = _train_config(ctx, work / name)
        # the first run also compiles the kernels and measures the designs (cached for the second)
        limit = (deadline - time.monotonic()) * (0.6 if name == "plain" else 1.0)
        rc, _ = run_child(launch + extra + [str(Path(__file__).resolve()), "--train-worker", str(cfg)],
                          limit, ctx.log, env)
        if rc != 0:
            sec.status = f"FAILED: {name} run {'timed out' if rc is None else f'rc {rc}'}"
            return
        types[name] = json.loads((work / name / "distributed_type.json").read_text())["distributed_type"]
    sec.details["distributed_type"] = types
    a, b = (load_file(str(work / n / "adapter" / "adapter_model.safetensors")) for n in runs)
    if a.keys() != b.keys():
        sec.status = f"FAILED: adapter keys differ ({sorted(a.keys() ^ b.keys())[:4]})"
        return
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    rel = (num / max(den, 1e-30)) ** 0.5
    sec.details.update(rel_l2_adapter_diff=rel, tolerance=FSDP_TOL, tensors=len(a),
                       max_abs_diff=max(float((a[k] - b[k]).abs().max()) for k in a))
    is_fsdp = types["fsdp"].endswith("FSDP")
    if not ctx.smoke and not is_fsdp:
        sec.status = f"FAILED: '--use_fsdp' ran {types['fsdp']}, not FSDP"
    elif rel > FSDP_TOL or not torch.isfinite(torch.tensor(rel)):
        sec.status = f"FAILED: adapters differ, relative L2 {rel:.3g} > {FSDP_TOL}"
    else:
        sec.status = "passed" + ("" if is_fsdp else " (smoke: two plain runs; FSDP needs a GPU)")


def train_worker(cfg_path: str) -> int:
    """Inside ``accelerate launch``: train, then record which distributed type accelerate used."""
    from accelerate.state import AcceleratorState

    from fastfair.cli import main as cli

    rc = cli(["train", "--config", cfg_path])
    out = Path(json.loads(Path(cfg_path).read_text())["output_dir"])
    (out / "distributed_type.json").write_text(json.dumps(
        {"distributed_type": str(AcceleratorState().distributed_type)}))
    return rc


# name: (run, limit on the GPU s, limit of the CPU smoke run s). 450 s in all on the GPU, inside the
# 8 minutes with the start-up; the smoke limits are loose: a shared CPU can be slow.
SECTIONS = {
    "tests": (tests_section, 140, 180),
    "lora": (bench_section("lora_linear.py", [], ["--smoke"]), 190, 240),
    "grouped_ce": (bench_section("grouped_ce.py", [], ["--smoke"]), 20, 120),
    "train_step": (bench_section("train_step.py", ["--kinds", "peft,fastfair,ff_int8,floor"], ["--smoke"]),
                   30, 180),
    "fsdp": (fsdp_section, 70, 300),
}


@dataclass
class Context:
    smoke: bool
    results: Path
    tag: str
    log: Path
    scale: float

    def budget(self, sec: Section) -> float:
        return (sec.smoke_budget_s if self.smoke else sec.budget_s) * self.scale


def write_summary(ctx, env: dict, sections: list[Section], failed: bool) -> Path:
    stem = ctx.results / f"gpu_check-{ctx.tag}"
    data = {"env": env, "smoke": ctx.smoke, "failed": failed,
            "sections": [dict(name=s.name, status=s.status, seconds=round(s.seconds, 1), **s.details)
                         for s in sections]}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    lines = ["# gpu_check" + (" (CPU smoke: toy sizes, numbers mean nothing)" if ctx.smoke else ""), ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in sections]
    for s in sections:
        for key in ("summary", "distributed_type", "rel_l2_adapter_diff"):
            if key in s.details:
                lines.append(f"\n{s.name} {key}: {s.details[key]}")
        for key in ("fastfair_errors", "baseline_errors"):
            if s.details.get(key):
                lines += ["", f"{s.name} {key}:", "", *[f"- {e}" for e in s.details[key][:20]]]
        if s.details.get("printed"):
            lines += ["", f"{s.name}:", "", "```", *s.details["printed"], "```"]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def _fastfair_importable() -> str | None:
    """None, or why the children cannot import fastfair with its kernels (a bare clone)."""
    cmd = PY + ["-c", "import fastfair.kernels, fastfair.ops.lora"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every section at toy sizes on the CPU")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--results-dir", default=str(BENCH / "results"))
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's limit")
    ap.add_argument("--train-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_worker:
        return train_worker(args.train_worker)

    import torch

    sys.path.insert(0, str(BENCH))
    from harness import device_tag, environment

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device)
    ctx = Context(smoke, results, tag, results / f"gpu_check-{tag}.log", args.budget_scale)
    ctx.log.write_text("")
    # a fresh design cache, so the dispatcher measures on this device instead of reading an old
    # choice; it is kept beside the results as the record of what it measured
    os.environ["FASTFAIR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="fastfair-cache-")
    if (why := _fastfair_importable()) is not None:
        print(f"gpu_check: fastfair with its kernels is not importable ({why}); install it first "
              "(bench/README.md: 'On a GPU')", file=sys.stderr)
        return 2
    env = environment(device)
    sections = [Section(n, *SECTIONS[n][1:]) for n in args.sections]
    for sec in sections:
        t0 = time.monotonic()
        try:
            SECTIONS[sec.name][0](ctx, sec)
        except Exception as e:  # the section's own bug: recorded, the others still run
            sec.status = f"FAILED: {type(e).__name__}: {e}"
        sec.seconds = time.monotonic() - t0
        print(f"== {sec.name}: {sec.status} ({sec.seconds:.0f} s)", flush=True)
    for f in Path(cache).glob("*.json"):
        (results / f"{f.stem}-{tag}.json").write_text(f.read_text())
    failed = any(s.status.startswith("FAILED") for s in sections)
    md = write_summary(ctx, env, sections, failed)
    print(md.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

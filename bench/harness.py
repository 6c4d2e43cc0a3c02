"""One harness for every benchmark, in the shape of Liger-Kernel's ``run_benchmarks``.

A benchmark supplies only its set-up: the shapes (most important first), the inputs of a shape,
and per provider a function ``setup(shape, inputs, device) -> Case``. The harness owns the rest:

* **modes** (``MODES``): ``forward``, ``backward`` (of a retained forward), ``full`` (forward +
  backward, or the case's own step), ``memory`` (peak CUDA memory of ``full``), and the host-side
  modes ``host_forward`` / ``host_full``: microseconds of CPU per call with no synchronization
  inside the loop, the per-layer Python overhead when the shape is too small to keep a GPU busy;
* **runners** (``RUNNERS``): ``eager``, or ``cuda_graph`` (the call captured once and replayed);
* **timing** (``TIMERS``): on CUDA ``triton.testing.do_bench`` (it flushes L2 between calls and
  synchronizes), on the CPU wall-clock samples. Each shape is timed in ``rounds`` that interleave
  the providers, so a ratio can be given per round and its spread shown (a loaded machine drifts);
* **environment** (device, GPU, driver, versions, date, git commit, CPU load) and **output**:
  ``<results>/<bench>-<device>.json`` and ``.md``, rewritten after every shape (a run stopped by its
  time budget keeps what it measured), with each row's ratio to the benchmark's baseline providers
  in the same run (``x_<baseline>`` = this time / the baseline's time; lower is faster).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "triton", "timm", "peft", "bitsandbytes", "accelerate", "fastfair")


@dataclass
class Case:
    """One provider at one shape, as the benchmark set it up.

    ``fn()`` is one forward (returning a tensor) or, when ``inputs`` is empty, one whole step that
    does its own backward (``full`` then times ``fn`` itself). ``inputs`` are the tensors the
    backward differentiates for (the activation and the trainable parameters). ``context()`` is
    entered around every timed call and every capture (a forced kernel design, say).
    """
    fn: Callable[[], Any]
    inputs: Sequence[torch.Tensor] = ()
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str | None = None
    runners: Sequence[str] | None = None  # a subset of the run's runners; None: all of them


class NotApplicable(Exception):
    """Raised by a set-up when its provider cannot run the shape (the reason becomes the row's note)."""


@dataclass
class Benchmark:
    """What a benchmark script supplies; ``run_benchmarks`` does the rest."""
    name: str
    shapes: list[dict]
    providers: dict[str, Callable[[dict, Any, torch.device], Case]]
    baselines: Sequence[str] = ()
    modes: Sequence[str] = ("forward", "full", "memory")
    make_inputs: Callable[[dict, torch.device], Any] = lambda shape, device: None
    notes: str = ""
    summarize: Callable[[list[dict]], str] | None = None  # extra markdown (targets met or missed)


@dataclass
class Timing:
    """How long each measurement may take. ``rounds`` interleave the providers of a shape."""
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_warmup: int = 2
    cpu_reps: int = 5
    rounds: int = 1
    host_calls: int = 200
    # The command that reruns the benchmark script (``[python, script, *args]``): each (round,
    # provider) is then set up and timed in a fresh process. On the CPU a model built second in a
    # process ran up to 10% slower than the one built first (allocator state), which decided a
    # 0.9x-vs-1.0x comparison by build order alone. Empty: one process.
    isolate: Sequence[str] = ()


# -- modes: a case -> the zero-argument call to time ----------------------------------------
def _out_grad(case: Case):
    with case.context():
        y = case.fn()
    return y, torch.randn_like(y)


def _forward(case: Case):
    return case.fn


def _backward(case: Case):
    if not case.inputs:
        return None
    y, dy = _out_grad(case)
    return lambda: torch.autograd.grad(y, case.inputs, dy, retain_graph=True)


def _full(case: Case):
    if not case.inputs:
        return case.fn
    _, dy = _out_grad(case)
    return lambda: torch.autograd.grad(case.fn(), case.inputs, dy)


# mode: (builds the call, unit, kind of measurement)
MODES = {
    "forward": (_forward, "ms", "time"),
    "backward": (_backward, "ms", "time"),
    "full": (_full, "ms", "time"),
    "memory": (_full, "MB", "memory"),
    "host_forward": (_forward, "us", "host"),
    "host_full": (_full, "us", "host"),
}


# -- runners ----------------------------------------------------------------------------------
def _eager(call, case: Case, device):
    def run():
        with case.context():
            return call()
    return run


def _cuda_graph(call, case: Case, device):
    """Capture ``call`` once (after warm-up on a side stream, as torch.cuda.graph asks) and
    return its replay: the kernels run with no Python and no launch overhead."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), case.context():
        for _ in range(3):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), case.context():
        call()
    return graph.replay


RUNNERS = {"eager": _eager, "cuda_graph": _cuda_graph}


# -- timers: a call -> samples ------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cuda(run, device, t: Timing) -> list[float]:
    from triton.testing import do_bench

    return [float(v) for v in do_bench(run, warmup=t.warmup_ms, rep=t.rep_ms, return_mode="all")]


def _time_cpu(run, device, t: Timing) -> list[float]:
    for _ in range(t.cpu_warmup):
        run()
    samples = []
    for _ in range(t.cpu_reps):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _time_host(run, device, t: Timing) -> list[float]:
    """Microseconds of host time per call: ``host_calls`` calls with no synchronization between
    them, so on a GPU at a tiny shape this is the Python and launch cost the GPU waits on."""
    for _ in range(3):
        run()
    _sync(device)
    samples = []
    for _ in range(t.cpu_reps):
        t0 = time.perf_counter()
        for _ in range(t.host_calls):
            run()
        samples.append((time.perf_counter() - t0) * 1e6 / t.host_calls)
        _sync(device)
    return samples


def _peak_memory(run, device, t: Timing) -> list[float] | None:
    """Peak CUDA memory of one call above what was allocated before it (MB)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    _sync(device)
    return [(torch.cuda.max_memory_allocated(device) - before) / 2**20]


def _measure(kind, run, device, t: Timing) -> list[float] | None:
    if kind == "time":
        return (_time_cuda if device.type == "cuda" else _time_cpu)(run, device, t)
    return {"host": _time_host, "memory": _peak_memory}[kind](run, device, t)


# -- environment and output ---------------------------------------------------------------------
def device_tag(device: torch.device) -> str:
    """``cpu``, or the GPU's name as a file-name slug (``nvidia-h200``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # a copy of the tree without .git (the device machine): the caller says
        return os.environ.get("FASTFAIR_GIT_COMMIT", "unknown")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(),
        "device": device_tag(device),
        "python": platform.python_version(),
        **{pkg: _version(pkg) for pkg in PACKAGES},
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
        env["timing"] = "triton.testing.do_bench (L2 flushed per call), median and 20/80th percentiles"
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["timing"] = "CPU wall-clock, median and 20/80th percentiles of the samples"
    return env


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def write_results(bench: Benchmark, env: dict, rows: list[dict], results_dir: Path,
                  skipped: Sequence[dict] = ()) -> Path:
    """``<results_dir>/<bench>-<device>.json`` and ``.md``; returns the markdown path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{bench.name}-{env['device']}"
    env = {**env, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    stem.with_suffix(".json").write_text(json.dumps(
        {"bench": bench.name, "env": env, "notes": bench.notes, "rows": rows,
         "skipped_shapes": list(skipped)}, indent=1, default=str) + "\n")
    shape_cols = list(dict.fromkeys(k for s in bench.shapes for k in s))
    ratio_cols = [c for b in bench.baselines for c in (f"x_{b}", f"x_{b}_range")
                  if any(c in r for r in rows)]
    cols = shape_cols + ["provider", "runner", "mode", "unit", "median", "p20", "p80"] + ratio_cols + ["note"]
    lines = [f"# {bench.name}", ""] + [f"- {k}: {v}" for k, v in env.items()]
    if bench.notes:
        lines += ["", bench.notes]
    if skipped:
        lines += ["", f"Not measured (time budget spent): {len(skipped)} shape(s), listed in the JSON."]
    if bench.summarize is not None and rows:
        lines += ["", bench.summarize(rows)]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """One (provider, runner, mode) of a shape: its call and its samples per round."""
    row: dict
    kind: str
    run: Callable | None = None
    rounds: list[list[float]] = field(default_factory=list)


def _prepare(bench, shape, inputs, device, modes, runners) -> list[_Slot]:
    """Set every provider up and build each (runner, mode) call; failures become rows, not crashes."""
    slots = []
    for provider, setup in bench.providers.items():
        base = {**shape, "provider": provider}
        try:
            case = setup(shape, inputs, device)
        except NotApplicable as e:
            slots.append(_Slot({**base, "note": f"n/a: {e}"}, "n/a"))
            continue
        except Exception as e:  # a baseline that cannot run here is a result, not a crash
            slots.append(_Slot({**base, "note": f"set-up failed: {type(e).__name__}: {str(e)[:160]}"}, "error"))
            continue
        if case is None:  # the provider does not apply to this shape
            continue
        for runner in (r for r in runners if case.runners is None or r in case.runners):
            for mode in modes:
                build, unit, kind = MODES[mode]
                if kind == "memory" and runner != "eager":  # a replay allocates nothing new
                    continue
                row = {**base, "runner": runner, "mode": mode, "unit": unit, "note": case.note}
                try:
                    call = build(case)
                    run = None if call is None else RUNNERS[runner](call, case, device)
                except Exception as e:
                    slots.append(_Slot({**row, "note": f"{type(e).__name__}: {str(e)[:160]}"}, "error"))
                    continue
                if run is not None:
                    slots.append(_Slot(row, kind, run))
    return slots


def _ratios(slots: list[_Slot], baselines: Sequence[str]) -> None:
    """``x_<b>``: median over rounds of (this round's median / the baseline's), and its range."""
    index = {(s.row["provider"], s.row["runner"], s.row["mode"]): s for s in slots if s.rounds}
    for s in slots:
        if not s.rounds or s.kind == "memory":
            continue
        for b in baselines:
            ref = index.get((b, s.row["runner"], s.row["mode"]))
            if ref is None or ref is s or len(ref.rounds) != len(s.rounds):
                continue
            per_round = [statistics.median(a) / statistics.median(r) for a, r in zip(s.rounds, ref.rounds)]
            s.row[f"x_{b}"] = statistics.median(per_round)
            if len(per_round) > 1:
                s.row[f"x_{b}_range"] = f"{min(per_round):.3g}-{max(per_round):.3g}"


CHILD_ENV = "FASTFAIR_BENCH_CHILD"


def _child(bench: Benchmark, device, timing: Timing, job: dict) -> None:
    """In an isolated child: set up one provider at one shape, measure each of its slots once and
    write ``[{row, kind, samples}]`` to ``job["out"]``."""
    shape = bench.shapes[job["shape"]]
    one = Benchmark(bench.name, bench.shapes, {job["provider"]: bench.providers[job["provider"]]},
                    make_inputs=bench.make_inputs)
    inputs = bench.make_inputs(shape, device)
    out = []
    for s in _prepare(one, shape, inputs, device, job["modes"], job["runners"]):
        samples = None
        if s.run is not None:
            try:
                samples = _measure(s.kind, s.run, device, timing)
            except Exception as e:
                s.row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
        out.append({"row": s.row, "kind": s.kind, "samples": samples})
    Path(job["out"]).write_text(json.dumps(out, default=str))


def _isolated_slots(bench, shape_index, device, modes, runners, timing: Timing) -> list[_Slot]:
    """Every (round, provider) in a fresh run of this script; the order rotates per round."""
    import tempfile

    slots: dict[tuple, _Slot] = {}
    providers = list(bench.providers)
    for r in range(timing.rounds):
        for provider in providers[r % len(providers):] + providers[:r % len(providers)]:
            with tempfile.TemporaryDirectory() as tmp:
                job = dict(shape=shape_index, provider=provider, modes=list(modes), runners=list(runners),
                           out=str(Path(tmp) / "out.json"))
                proc = subprocess.run(list(timing.isolate), env={**os.environ, CHILD_ENV: json.dumps(job)},
                                      capture_output=True, text=True)
                out = Path(job["out"])
                if proc.returncode != 0 or not out.exists():
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                    key = (provider, None, None)
                    slots[key] = _Slot({**bench.shapes[shape_index], "provider": provider,
                                        "note": f"child process failed ({proc.returncode}): {tail[0][:160]}"}, "error")
                    continue
                for item in json.loads(out.read_text()):
                    row = item["row"]
                    key = (provider, row.get("runner"), row.get("mode"))
                    slot = slots.setdefault(key, _Slot(row, item["kind"], run=None))
                    if item["samples"] is not None:
                        slot.rounds.append(item["samples"])
    return list(slots.values())


def _quantiles(samples: list[float]) -> dict:
    if len(samples) < 2:
        return {"median": samples[0]}
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {"median": statistics.median(samples), "p20": q[1], "p80": q[7], "samples": len(samples)}


def run_shape(bench, shape, device, modes, runners, timing: Timing, index: int = 0) -> list[dict]:
    if timing.isolate:
        slots = _isolated_slots(bench, index, device, modes, runners, timing)
        _ratios(slots, bench.baselines)
        return [{**s.row, **_quantiles([v for r in s.rounds for v in r])} if s.rounds else s.row
                for s in slots]
    inputs = bench.make_inputs(shape, device)
    slots = _prepare(bench, shape, inputs, device, modes, runners)
    for _ in range(timing.rounds):
        for s in slots:
            if s.run is None:
                continue
            try:
                samples = _measure(s.kind, s.run, device, timing)
            except Exception as e:  # OOM, a capture the provider does not support, ...
                s.row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
                s.rounds = []
                s.run = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if samples is not None:
                s.rounds.append(samples)
    _ratios(slots, bench.baselines)
    rows = []
    for s in slots:
        if s.rounds:
            s.row.update(_quantiles([v for r in s.rounds for v in r]))
        if s.rounds or s.run is None:  # measured, or failed (the row says how)
            rows.append(s.row)
    return rows


def run_benchmarks(bench: Benchmark, device: torch.device | str, *, modes: Sequence[str] | None = None,
                   runners: Sequence[str] = ("eager",), timing: Timing | None = None,
                   budget_s: float | None = None, results_dir: Path | str | None = None,
                   on_shape: Callable[[dict, list[dict]], None] | None = None) -> Path:
    """Time every provider of ``bench`` at every shape, in order, until ``budget_s`` is spent.

    Shapes left when the budget runs out are listed as skipped, not silently dropped. Results are
    rewritten after every shape; ``on_shape(shape, rows)`` lets the script print as it goes.
    With ``timing.isolate`` the script is rerun once per (round, provider); in that child this
    function measures its one job, writes it for the parent and exits the process.
    """
    import sys

    device = torch.device(device)
    modes = [m for m in (modes or bench.modes) if not (m == "memory" and device.type != "cuda")]
    runners = [r for r in runners if r == "eager" or device.type == "cuda"]
    timing = timing or Timing()
    if os.environ.get(CHILD_ENV):
        _child(bench, device, timing, json.loads(os.environ[CHILD_ENV]))
        sys.exit(0)
    results_dir = Path(results_dir) if results_dir is not None else RESULTS
    env = environment(device)
    env["runners"], env["modes"], env["rounds"] = list(runners), list(modes), timing.rounds
    env["isolated"] = bool(timing.isolate)
    start, rows, skipped = time.monotonic(), [], []
    for i, shape in enumerate(bench.shapes):
        if budget_s is not None and time.monotonic() - start > budget_s:
            skipped = bench.shapes[i:]
            break
        shape_rows = run_shape(bench, shape, device, modes, runners, timing, i)
        rows += shape_rows
        if on_shape is not None:
            on_shape(shape, shape_rows)
        write_results(bench, env, rows, results_dir)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return write_results(bench, env, rows, results_dir, skipped)

"""Faults an operator meets: kills, damaged checkpoints, divergence, reused and resumed run directories.

Each must neither lose a finite checkpoint, nor mix two runs, nor resume something other than what
the run directory says. Runs are tiny (2 blocks at 16 px, 2 x 8 steps) and few: this file shares
one reference run between its tests.
"""
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

from fastfair.config import TrainConfig
from fastfair.train_cli import main
from fastfair.trainer import checkpoint, latest_checkpoint, train

# 1074 training rows at batch 128: 8 steps per epoch, 16 in all; a checkpoint every 3 steps
RUN = dict(model="test_vit", img_size=16, patch_size=8, depth=2, rank=4, epochs=2, batch_size=128,
           eval_batch_size=512, repeats=1, log_with=None, report_ci=False, warmup_steps=1, lam=0.5,
           penalty="worst", lora_dropout=0.1, save_every=3, keep_checkpoints=2, log_every=4)
TOTAL = 16


def flags(**kw) -> list[str]:
    out = []
    for k, v in {**RUN, **kw}.items():
        out += [f"--{k.replace('_', '-')}", json.dumps(v) if not isinstance(v, str) else v]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(TrainConfig(**RUN, output_dir=str(out)))
    return out


def epoch_lines(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in lines]


def assert_same_run(a: Path, b: Path):
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for split in ("val", "test"):
        pa, pb = np.load(a / f"predictions_{split}.npz"), np.load(b / f"predictions_{split}.npz")
        np.testing.assert_array_equal(pa["probs"], pb["probs"])
    assert epoch_lines(a) == epoch_lines(b)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from torch.optim.optimizer import register_optimizer_step_post_hook
    import accelerate
    import fastfair.trainer.select as select
    from fastfair.train_cli import main

    kill_at, phase, steps = int(sys.argv[1]), sys.argv[2], [0]
    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)
    def count(*_):
        steps[0] += 1
        if phase == "step" and steps[0] == kill_at:
            die()
    register_optimizer_step_post_hook(count)
    real_save, real_update = accelerate.Accelerator.save_state, select.Selection.update
    def save_state(self, *a, **k):  # killed with the files written, before the manifest and rename
        real_save(self, *a, **k)
        if phase == "save" and steps[0] >= kill_at:
            die()
    def update(self, *a, **k):  # killed after a validation line, before that epoch's checkpoint
        if phase == "epoch_end":
            die()
        return real_update(self, *a, **k)
    accelerate.Accelerator.save_state, select.Selection.update = save_state, update
    sys.exit(main(sys.argv[3:]))
""")


@given(kill_at=st.integers(4, TOTAL), phase=st.sampled_from(["step", "save", "epoch_end"]))
@settings(max_examples=2, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sigkill_at_any_step_then_resume_is_bit_identical(tmp_path, reference, kill_at, phase):
    out = tmp_path / f"kill_{phase}_{kill_at}"
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(kill_at), phase,
                           *flags(output_dir=str(out))], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(out) is not None
    assert main(["--resume", str(out)]) == 0
    assert_same_run(reference, out)


def test_each_damaged_checkpoint_file_is_named_and_skipped(tmp_path, reference):
    newest, previous = checkpoint.checkpoints(reference)[-2:][::-1]
    assert checkpoint.usable(reference) == (newest, True)
    for f in sorted(p.name for p in newest.iterdir()):
        for damage in ("flip", "truncate"):
            run = tmp_path / f"{f}_{damage}"
            shutil.copytree(reference / "checkpoints", run / "checkpoints")
            victim = run / "checkpoints" / newest.name / f
            data = bytearray(victim.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0x10
            else:
                data = data[: len(data) // 2]
            victim.write_bytes(bytes(data))
            if f.startswith("random_states"):
                with pytest.raises(ValueError, match=f"{f}.*--resume-without-rng-state"):
                    checkpoint.usable(run)
                with pytest.warns(UserWarning, match="random states"):
                    assert checkpoint.usable(run, allow_missing_rng=True) == (victim.parent, False)
                continue
            with pytest.warns(UserWarning, match=f"{f} is .*falling back"):
                assert checkpoint.usable(run)[0].name == previous.name, (f, damage)


def finished_copy(reference: Path, out: Path) -> Path:
    """The reference run without its final outputs, so that a resume must write them anew."""
    shutil.copytree(reference, out)
    for name in ("adapter", "predictions_val.npz", "predictions_test.npz", "report.md", "meta.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def test_resume_from_a_damaged_checkpoint_falls_back_and_matches(tmp_path, reference):
    out = finished_copy(reference, tmp_path / "run")
    assert [c.name for c in checkpoint.checkpoints(out)][-2:] == ["step_00000015", "step_00000016"]
    (out / "checkpoints" / "step_00000016" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning, match="model.safetensors is truncated"):
        assert main(["--resume", str(out)]) == 0  # from step 15: one step and the last validation again
    assert_same_run(reference, out)


def test_missing_random_states_refuse_to_resume_unless_asked(tmp_path, reference, capsys):
    out = finished_copy(reference, tmp_path / "run")
    config_before = (out / "config.yaml").read_bytes()
    (latest_checkpoint(out) / "random_states_0.pkl").unlink()
    assert main(["--resume", str(out)]) == 2
    assert "random_states_0.pkl: random states missing" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == config_before
    with pytest.warns(UserWarning, match="resuming without them"):
        assert main(["--resume", str(out), "--resume-without-rng-state"]) == 0
    assert (out / "adapter").is_dir()


def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(flags(output_dir=str(out), lr=1e4, save_every=1, max_steps=12)) == 1
    err = capsys.readouterr().err
    kept = checkpoint.checkpoints(out)
    assert kept and f"Last good checkpoint: {kept[-1]}" in err and "at step" in err
    for ckpt in kept:
        for name, t in load_file(str(ckpt / "model.safetensors")).items():
            assert torch.isfinite(t).all(), (ckpt.name, name)
    assert not (out / "adapter").exists()


def test_skip_policy_skips_a_nan_update_and_counts_it(tmp_path):
    from fastfair.models import create_backbone

    # no GroupDRO: its online weights would carry the NaN into every later step
    cfg = TrainConfig(**{**RUN, "epochs": 1, "save_every": 0, "penalty": "variance"}, nan_policy="skip",
                      output_dir=str(tmp_path / "run"))
    model, calls = create_backbone(cfg, num_classes=2), []

    def poison(module, args, output):  # the 3rd training forward returns NaN logits
        if module.training:
            calls.append(1)
            return output * torch.nan if len(calls) == 3 else output
    model.register_forward_hook(poison)
    res = train(cfg, backbone=model)
    assert epoch_lines(tmp_path / "run")[0]["skipped_updates"] == 1
    assert np.isfinite(res["val"]["accuracy"])
    for t in load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors")).values():
        assert torch.isfinite(t).all()


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_run_directory_belongs_to_one_run(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "step_99999999").mkdir()  # an old run's checkpoint, newer by number
    before = snapshot(out)
    assert main(flags(output_dir=str(out), lam=1.0)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and snapshot(out) == before
    assert main(flags(output_dir=str(out), lam=1.0, max_steps=3, epochs=1, save_every=0, overwrite=True)) == 0
    assert [c.name for c in checkpoint.checkpoints(out)] == ["step_00000003"]
    assert [r.get("step") for r in epoch_lines(out) if "epoch" in r] == [3]
    assert "lam: 1.0" in (out / "config.yaml").read_text() and "overwrite" not in (out / "config.yaml").read_text()


def test_resume_refuses_changes_and_keeps_the_config(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert main(["--resume", str(out), "--batch-size", "8", "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "batch_size: 128 in the run, 8 now" in err and "rank: 4 in the run, 2 now" in err
    assert main(["--resume", str(out), "--output-dir", str(tmp_path / "elsewhere")]) == 2
    assert "--output-dir and --resume" in capsys.readouterr().err
    assert snapshot(out) == before and not (tmp_path / "elsewhere").exists()


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    for name in ("step_9", "step_10", "step_00000002", ".tmp_step_00000011", "step_x"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [c.name for c in checkpoint.checkpoints(tmp_path)] == ["step_00000002", "step_9", "step_10"]
    checkpoint.rotate(tmp_path, keep=1, protect={2})
    assert [c.name for c in checkpoint.checkpoints(tmp_path)] == ["step_00000002", "step_10"]


def test_resume_truncates_metrics_to_the_checkpoint(tmp_path):
    from fastfair.trainer.rundir import truncate_metrics

    lines = [{"epoch": 0, "step": 8}, {"epoch": 1, "step": 16}, {"selected_epoch": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    truncate_metrics(tmp_path, epochs_done=1)
    assert epoch_lines(tmp_path) == lines[:1]


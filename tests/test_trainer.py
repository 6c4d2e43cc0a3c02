"""The trainer end to end on the CPU: smoke runs, resume, 2 processes, bad data, FairLoRA's effect."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastfair.config import TrainConfig, load_config
from fastfair.train_cli import main
from fastfair.trainer import latest_checkpoint, train


def tiny(tmp_path, **kw):
    base = dict(model="test_vit", img_size=16, patch_size=8, depth=2, rank=4, epochs=1, max_steps=2,
                batch_size=16, eval_batch_size=128, repeats=1, log_with=None, log_every=1,
                report_ci=False, output_dir=str(tmp_path / "run"), warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def epoch_records(run_dir):
    """metrics.jsonl's per-epoch lines (the last line says which epoch was selected)."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "epoch" in r]


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_smoke_colored_digits_writes_run_dir(tmp_path, capsys):
    res = train(tiny(tmp_path, lam=1.0))
    printed = capsys.readouterr().out  # not a terminal: no progress bar, one line per epoch
    assert "\r" not in printed and printed.count("[run] epoch 0 step 2 loss=") == 1
    assert printed.startswith("[run] test_vit LoRA r=4") and len(printed.splitlines()) <= 4
    out = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "predictions_val.npz", "predictions_test.npz",
              "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "meta.json"):
        assert (out / f).is_file(), f
    assert len(list((out / "checkpoints").glob("step_*"))) == 1
    assert 0.0 <= res["test"]["accuracy"] <= 1.0 and len(res["test"]["group_accuracy"]) == 4
    record = epoch_records(out)[-1]
    assert record["step"] == 2 and "val/worst_group_accuracy" in record
    assert load_config(out / "config.yaml").lam == 1.0


def write_csv_dataset(root, rows):
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["path,label,group,split"]
    rng = np.random.default_rng(0)
    for i, (label, group, split) in enumerate(rows):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{label},{group},{split}")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")


def test_smoke_csv(tmp_path):
    rows = [(i % 2, (i // 2) % 2, "train" if i < 24 else ("val" if i < 30 else "test")) for i in range(36)]
    write_csv_dataset(tmp_path, rows)
    res = train(tiny(tmp_path, data="csv", csv_path=str(tmp_path / "meta.csv"), batch_size=8,
                     penalty="worst", lam=1.0))
    assert len(res["test"]["group_accuracy"]) == 2


def test_bad_csv_fails_before_training(tmp_path):
    rows = [(0, 0, "train"), (1, 1, "val"), (1, 0, "test")]
    write_csv_dataset(tmp_path, rows)
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"1\.png"):
        train(tiny(tmp_path, data="csv", csv_path=str(tmp_path / "meta.csv")))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("balanced", [False, True])
def test_resume_gives_the_same_weights(tmp_path, balanced):
    kw = dict(max_steps=None, epochs=2, batch_size=32, lam=0.5, penalty="worst", balanced_sampling=balanced)
    full = tiny(tmp_path, output_dir=str(tmp_path / "full"), **kw)
    train(full)
    steps = epoch_records(tmp_path / "full")[-1]["step"]
    assert steps > 4
    part = tiny(tmp_path, output_dir=str(tmp_path / "part"), **kw)
    assert train(part, stop_after_steps=steps // 2 + 1)["stopped_at"] == steps // 2 + 1
    assert not (tmp_path / "part" / "adapter").exists()
    assert main(["--resume", str(tmp_path / "part")]) == 0
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _ddp_run(out_dir, batch_size):
    train(tiny(Path(out_dir), batch_size=batch_size, max_steps=3, lam=1.0, output_dir=out_dir))


def test_two_processes_match_one(tmp_path):
    from accelerate.utils import patch_environment
    from accelerate.utils.launch import PrepareForLaunch
    from torch.multiprocessing import start_processes

    one = tmp_path / "one"
    train(tiny(tmp_path, batch_size=32, max_steps=3, lam=1.0, output_dir=str(one)))
    two = tmp_path / "two"
    # accelerate's debug_launcher, but spawned: a forked child of a process that already ran
    # OpenMP deadlocks in libgomp. The file store needs no network port.
    with patch_environment(world_size=2, accelerate_debug_rdv_file=str(tmp_path / "rdv"),
                           accelerate_use_cpu="yes", accelerate_mixed_precision="no",
                           master_addr="127.0.0.1", gloo_socket_ifname="lo"):
        start_processes(PrepareForLaunch(_ddp_run, debug=True), args=(str(two), 16), nprocs=2,
                        start_method="spawn")
    a, b = adapter_tensors(one), adapter_tensors(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    pa, pb = np.load(one / "predictions_test.npz"), np.load(two / "predictions_test.npz")
    assert len(pa["labels"]) == len(pb["labels"])
    np.testing.assert_allclose(pa["probs"], pb["probs"], rtol=1e-4, atol=1e-5)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="finetune must be one of"):
        tiny(tmp_path, finetune="half").validate()
    (tmp_path / "c.yaml").write_text("rank: 4\nranks: 8\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['ranks'\]"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="xformers"):
        train(tiny(tmp_path, attn="xformers"))


def test_fairlora_lowers_validation_group_loss_variance(tmp_path):
    # the demo's model and data at a small budget: color predicts the label 95% of the time in
    # training and never in validation, so plain LoRA learns the color and its group losses split
    kw = dict(model="test_vit", img_size=32, patch_size=16, depth=None, max_steps=None, epochs=3,
              batch_size=64, lr=3e-3, seed=0)
    erm = train(tiny(tmp_path, lam=0.0, output_dir=str(tmp_path / "erm"), **kw))
    fair = train(tiny(tmp_path, lam=1.0, output_dir=str(tmp_path / "fair"), **kw))
    assert fair["val"]["loss_variance"] < 0.5 * erm["val"]["loss_variance"]


def test_flags_take_yaml_values():
    import argparse

    from fastfair.config import add_config_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(["--lr", "1e-3", "--targets", "[qkv, fc1]", "--checkpoint", "null"]))
    assert cfg.lr == 1e-3 and cfg.targets == ["qkv", "fc1"] and cfg.checkpoint is None
    with pytest.raises(SystemExit):
        p.parse_args(["--lr", "fast"])


def test_on_epoch_end_stops_without_test_evaluation(tmp_path):
    seen = []
    res = train(tiny(tmp_path, max_steps=None, epochs=3, batch_size=64),
                on_epoch_end=lambda epoch, val: seen.append((epoch, val["accuracy"])) or True)
    assert [e for e, _ in seen] == [0] and res["stopped_at_epoch"] == 0
    assert res["val"]["accuracy"] == seen[0][1] and "test" not in res
    assert not (tmp_path / "run" / "predictions_test.npz").exists()
    assert latest_checkpoint(tmp_path / "run") is not None


def test_grad_accum_covers_the_epoch_and_averages_a_partial_window(tmp_path):
    # 16 batches per epoch in windows of 3: five full windows and a last one of a single batch.
    # At lr 1e-12 the model does not move, so each step's gradient must be the mean of the
    # per-batch gradients of a run without accumulation over its window.
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    grads = {}
    kw = dict(max_steps=None, epochs=1, batch_size=64, lr=1e-12, warmup_steps=0, lam=0.0)
    for accum in (1, 3):
        def record(opt, args, kwargs, accum=accum):
            grads.setdefault(accum, []).append(torch.cat(
                [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
        handle = register_optimizer_step_pre_hook(record)
        try:
            train(tiny(tmp_path, output_dir=str(tmp_path / f"accum{accum}"), grad_accum=accum, **kw))
        finally:
            handle.remove()
    per_batch = torch.stack(grads[1])
    assert len(per_batch) == 16
    windows = [per_batch[i:i + 3].mean(0) for i in range(0, 16, 3)]
    assert len(grads[3]) == len(windows) == 6
    for got, want in zip(grads[3], windows):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("key, value", [("warmup_steps", -1), ("save_every", -5), ("min_lr_ratio", 1.5),
                                        ("min_lr_ratio", -0.1), ("weight_decay", -0.01), ("num_workers", -1)])
def test_config_rejects_out_of_range_schedule_values(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key} must be .*{value}"):
        tiny(tmp_path, **{key: value}).validate()


def test_resume_after_a_stop_at_the_last_step_still_validates_that_epoch(tmp_path):
    kw = dict(max_steps=3, epochs=1, batch_size=32)
    train(tiny(tmp_path, output_dir=str(tmp_path / "full"), **kw))
    assert train(tiny(tmp_path, output_dir=str(tmp_path / "part"), **kw), stop_after_steps=3)["stopped_at"] == 3
    assert main(["--resume", str(tmp_path / "part")]) == 0
    full, part = (epoch_records(tmp_path / d) for d in ("full", "part"))
    assert [r["step"] for r in part] == [r["step"] for r in full] == [3]
    assert part[0]["val/accuracy"] == full[0]["val/accuracy"]


def test_local_checkpoint_resamples_position_embeddings_and_rejects_misfits(tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed

    from fastfair.models import load_backbone_weights

    def vit(**kw):
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, depth=1, **kw)

    torch.manual_seed(0)
    src = vit(num_classes=10, img_size=32)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = vit(num_classes=3, img_size=48)  # a 6x6 grid where the checkpoint has 4x4
    assert sorted(load_backbone_weights(dst, tmp_path / "w.pth")) == ["head.bias", "head.weight"]
    want = resample_abs_pos_embed(src.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), want)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer.*patch_embed"):
        load_backbone_weights(vit(num_classes=3, img_size=32, embed_dim=96, num_heads=3), tmp_path / "w.pth")
    # another depth: blocks the checkpoint lacks would stay random, blocks the model lacks be dropped
    for depth in (2, None):
        kw = dict(depth=depth) if depth else {}
        with pytest.raises(ValueError, match=r"another architecture.*blocks\.1\."):
            load_backbone_weights(timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8,
                                                    num_classes=3, img_size=32, **kw), tmp_path / "w.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, num_classes=10,
                                 img_size=32, depth=2).state_dict(), tmp_path / "w2.pth")
    with pytest.raises(ValueError, match=r"another architecture.*the model lacks \['blocks\.1\."):
        load_backbone_weights(vit(num_classes=3, img_size=32), tmp_path / "w2.pth")


def test_train_split_smaller_than_a_batch_is_an_error(tmp_path):
    rows = [(i % 2, (i // 2) % 2, "train" if i < 24 else ("val" if i < 30 else "test")) for i in range(36)]
    write_csv_dataset(tmp_path, rows)
    with pytest.raises(ValueError, match="train split has 24 samples.*batch_size=32"):
        train(tiny(tmp_path, data="csv", csv_path=str(tmp_path / "meta.csv"), batch_size=32))


def test_select_by_keeps_and_tests_the_best_validation_epoch(tmp_path, monkeypatch):
    import fastfair.trainer.loop as loop

    # the validation metric is made to peak at epoch 1 of 3; the other metrics are the real ones
    real, peaks, seen = loop.evaluate, [0.2, 0.9, 0.5], []

    def evaluate(*args):
        metrics = real(*args)
        epoch, compute = len(seen), metrics.compute
        seen.append(epoch)
        metrics.compute = lambda: {**compute(), "worst_group_accuracy": peaks[epoch]}
        return metrics

    monkeypatch.setattr(loop, "evaluate", evaluate)
    res = train(tiny(tmp_path, max_steps=None, epochs=3, batch_size=128, keep_checkpoints=1,
                     select_by="worst_group_accuracy"))
    out = tmp_path / "run"
    records = epoch_records(out)
    assert [r["val/worst_group_accuracy"] for r in records] == peaks and len(seen) == 3
    assert res["selected_epoch"] == 1 and res["selection"]["value"] == 0.9
    assert "highest val/worst_group_accuracy" in res["selection"]["reason"]
    # the selected epoch's checkpoint outlives rotation (keep 1) and the final test ran at its weights
    assert [c.name for c in sorted((out / "checkpoints").iterdir())] == ["step_00000016", "step_00000024"]
    real_vals = [(r["val/accuracy"], r["val/loss_variance"]) for r in records]
    assert real_vals[1] != real_vals[2]
    assert (res["val"]["accuracy"], res["val"]["loss_variance"]) == real_vals[1]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["selected_epoch"] == 1 and json.loads((out / "meta.json").read_text())["selection"] == last


def test_select_by_auto_and_null_fall_back_to_the_last_epoch():
    from fastfair.trainer.select import Selection

    assert Selection.resolve("auto", num_groups=4).metric == "worst_group_accuracy"
    assert Selection.resolve("auto", num_groups=1).metric is None
    assert Selection.resolve("accuracy_gap", 4).higher is False
    with pytest.raises(ValueError, match="select_by must be .*'worst_acc'"):
        Selection.resolve("worst_acc", 4)


def test_select_by_ties_go_to_the_later_epoch():
    # A metric stuck at one value (worst-group accuracy 0 over 100 tiny groups) once kept epoch 0 of
    # every run: a barely trained model reported as the result.
    from types import SimpleNamespace

    from fastfair.trainer.select import Selection

    for metric, values, want in (("worst_group_accuracy", [0.0, 0.0, 0.0], 2), ("worst_group_accuracy",
                                 [0.1, 0.5, 0.5, 0.2], 2), ("accuracy_gap", [0.3, 0.1, 0.2, 0.1], 3)):
        sel = Selection.resolve(metric, num_groups=4)
        state = SimpleNamespace(best_value=None, best_epoch=None, best_step=None)
        for epoch, v in enumerate(values):
            state.epoch, state.step = epoch, 10 * epoch
            sel.update(state, {metric: v})
        assert state.best_epoch == want, (metric, values)


def test_eager_attention_matches_sdpa():
    import timm

    from fastfair.models import set_attention_backend

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=16, patch_size=8, depth=2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)
        set_attention_backend(model, "eager")
        assert not model.blocks[0].attn.fused_attn
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)

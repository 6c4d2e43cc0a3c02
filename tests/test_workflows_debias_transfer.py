"""PEFTDebias and bias-transfer workflows: the ASR metric on constructed models, the counterfactual
data, the frozen upstream adapter, and both commands end to end in a tiny configuration."""
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fastfair.config import TrainConfig
from fastfair.data import ColoredDigits, add_trigger, digit_mask
from fastfair.inject import lora_layers
from fastfair.workflows import bias_transfer as bt
from fastfair.workflows import debias as db

TARGET = 3  # the class the constructed "biased" model jumps to


def tiny(tmp_path, **kw):
    base = dict(model="test_vit", img_size=16, patch_size=8, depth=2, rank=4, epochs=1, max_steps=2,
                batch_size=16, eval_batch_size=256, repeats=1, log_with=None, log_every=1,
                report_ci=False, output_dir=str(tmp_path / "run"), warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


# -- the metric on constructed models --------------------------------------------------------
def pixel_images(labels):
    """Images whose class is written in the top-left pixel; the bottom-right corner stays 0."""
    x = torch.zeros(len(labels), 3, 16, 16)
    x[:, 2, 0, 0] = torch.as_tensor(labels, dtype=torch.float32)
    return x


class ReadsPixel(nn.Module):
    """Predicts the class written in the top-left pixel: blind to a corner trigger."""

    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x[:, 2, 0, 0].round().long(), 5).float()


class JumpsOnTrigger(ReadsPixel):
    """Like ``ReadsPixel``, but predicts TARGET whenever the yellow corner patch is there."""

    def forward(self, x):
        logits = super().forward(x)
        hit = x[:, 0, -1, -1] > 1.0  # normalized yellow's red channel is ~2.2; clean is 0
        logits[hit] = 10.0 * nn.functional.one_hot(torch.tensor(TARGET), 5).float()
        return logits


def patch(x):
    return add_trigger(x, "patch", size=2, corner="bottom_right")


def test_asr_zero_for_a_model_that_ignores_the_trigger():
    labels = torch.arange(20) % 5
    m = bt.asr(ReadsPixel(), pixel_images(labels), labels, patch, target_class=TARGET)
    assert m["n_correct"] == 20
    assert m["asr"] == 0.0 and m["flip_rate"] == 0.0 and m["note"] == ""


def test_asr_one_for_a_model_that_always_jumps_to_the_trigger_class():
    off_target = torch.tensor([0, 1, 2, 4] * 5)
    m = bt.asr(JumpsOnTrigger(), pixel_images(off_target), off_target, patch, target_class=TARGET)
    assert m["asr"] == 1.0 and m["flip_rate"] == 1.0
    # images already of the trigger's class cannot flip: ASR counts them, flip rate leaves them out
    mixed = torch.arange(20) % 5
    m = bt.asr(JumpsOnTrigger(), pixel_images(mixed), mixed, patch, target_class=TARGET)
    assert m["asr"] == pytest.approx(16 / 20)
    assert m["flip_rate"] == 1.0 and m["n_flip_eligible"] == 16


def test_asr_conditions_on_correct_clean_predictions():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.tensor([0, 1, 1, 1, 0, 2])  # rows 0, 2, 3, 5 correct
    trig = torch.tensor([2, 2, 2, 1, 2, 2])  # of those, rows 0 and 2 flip, both to class 2
    m = bt.attack_success_rate(clean, trig, y, target_class=2)
    assert m["n_correct"] == 4 and m["asr"] == 0.5
    assert m["n_flip_eligible"] == 3 and m["flip_rate"] == pytest.approx(2 / 3)  # row 5 is class 2
    assert bt.attack_success_rate(clean, trig, y)["flip_rate"] is None


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40),
       st.integers(0, 3))
def test_asr_matches_its_definition(triples, t):
    y, pc, pt = (torch.tensor(c) for c in zip(*triples))
    m = bt.attack_success_rate(pc, pt, y, target_class=t)
    ok = [(a, b, c) for a, b, c in triples if b == a]
    if ok:
        assert m["asr"] == pytest.approx(sum(c != a for a, _, c in ok) / len(ok))
    else:
        assert m["asr"] is None and "undefined" in m["note"]
    elig = [(a, c) for a, _, c in ok if a != t]
    assert m["flip_rate"] == (pytest.approx(sum(c == t for _, c in elig) / len(elig)) if elig else None)


def test_asr_undefined_without_correct_predictions_is_none_not_a_crash():
    y = torch.tensor([0, 1, 2])
    m = bt.attack_success_rate(torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2]), y, target_class=0)
    assert m["asr"] is None and m["flip_rate"] is None and m["n_correct"] == 0
    assert "ASR undefined" in m["note"] and "flip rate undefined" in m["note"]
    m = bt.attack_success_rate([], [], [])
    assert m["asr"] is None and m["n"] == 0


def test_asr_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        bt.attack_success_rate([0, 1], [0], [0, 1])


def test_parse_modes():
    assert bt.parse_modes("linear, lora:4,fairlora:2,full,scratch") == [
        ("linear", None), ("lora", 4), ("fairlora", 2), ("full", None), ("scratch", None)]
    for bad in ("lora", "lora:0", "full:3", "probe", ""):
        with pytest.raises(ValueError):
            bt.parse_modes(bad)


def test_benchmark_halves_share_no_source_image():
    cfg = TrainConfig(img_size=16, repeats=2)
    src, tgt = bt.benchmark_tasks(cfg, "binary", seed=0)
    a = set(src["train"].base.source_index[src["train"].indices].tolist())
    b = set(tgt["train"].base.source_index[tgt["train"].indices].tolist())
    assert a and b and not a & b
    assert src["train"].num_classes == 10 and tgt["train"].num_classes == 2
    assert set(tgt["train"].labels.tolist()) == {0, 1}


# -- counterfactual data ---------------------------------------------------------------------
def test_counterfactual_twin_is_the_same_digit_in_another_color():
    base = ColoredDigits("train", image_size=12, repeats=1)
    cf = db.Counterfactual(base, seed=0)
    n = len(base)
    assert len(cf) == 2 * n and torch.equal(cf.labels[:n], cf.labels[n:])
    for i in (0, 5, n - 1):
        x, y, g = cf[i]
        tx, ty, tg = cf[n + i]
        assert y == ty and torch.allclose(digit_mask(x), digit_mask(tx), atol=1e-5)
        assert int(cf.cf_colors[i]) != int(base.colors[i]) and tg == y * 10 + int(cf.cf_colors[i])
        assert not torch.allclose(x, tx)


def test_counterfactual_needs_an_axis_or_a_function():
    class NoColor(torch.utils.data.Dataset):
        labels, groups = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        num_classes, num_groups = 2, 1

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), 0, 0

    with pytest.raises(ValueError, match="counterfactual function"):
        db.Counterfactual(NoColor())
    cf = db.Counterfactual(NoColor(), fn=lambda x, y, g: x + 1)
    assert torch.equal(cf[4][0], torch.ones(3, 4, 4)) and len(cf) == 6
    with pytest.raises(ValueError, match="module:function"):
        db.load_function("no_colon")
    with pytest.raises(ValueError, match="cannot load"):
        db.load_function("math:no_such_function")
    assert db.load_function("math:sqrt") is math.sqrt


# -- end to end ------------------------------------------------------------------------------
def test_bias_transfer_end_to_end(tmp_path):
    res = bt.bias_transfer(tiny(tmp_path, output_dir=str(tmp_path / "bt")), modes="lora:2",
                           debias_target=0.5, source_max_steps=2, seeds=(0,))
    rows = res["rows"]
    # 2 sources on their own task + 2 target variants x LoRA from each source
    assert len(rows) == 2 + 2 * 2
    assert {(r["source"], r["target"], r["mode"]) for r in rows} == {
        ("triggered", "source task", "source (itself)"), ("control", "source task", "source (itself)"),
        ("triggered", "plain", "lora"), ("control", "plain", "lora"),
        ("triggered", "debiased", "lora"), ("control", "debiased", "lora")}
    for r in rows:
        assert r["asr"] is None or 0.0 <= r["asr"] <= 1.0
    out = tmp_path / "bt"
    for f in ("results.csv", "results.json", "results.md", "asr.png"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["flip_class"] == 0  # trigger on digit 9 -> binary class 'digit>=5'
    assert (out / "seed0" / "triggered_plain_lora2" / "adapter" / "adapter_config.json").is_file()
    assert "lora r=2" in (out / "results.md").read_text()


def test_debias_end_to_end_leaves_the_upstream_adapter_unchanged(tmp_path, monkeypatch):
    import fastfair.trainer

    # Watch every training the workflow starts: a backbone carrying the frozen "debias" adapter
    # must come back with it bit-identical while the task adapter beside it has trained.
    real_train, seen = fastfair.trainer.train, []

    def watched(cfg, *args, backbone=None, **kw):
        before = db.adapter_state(backbone, "debias") if backbone is not None else {}
        res = real_train(cfg, *args, backbone=backbone, **kw)
        if before:
            frozen = [not (m.lora_A["debias"].requires_grad or m.lora_B["debias"].requires_grad)
                      for m in lora_layers(backbone).values() if "debias" in m.adapters]
            seen.append((before, db.adapter_state(backbone, "debias"), frozen,
                         db.adapter_state(backbone, "default")))
        return res

    monkeypatch.setattr(fastfair.trainer, "train", watched)
    cfg = tiny(tmp_path, output_dir=str(tmp_path / "db"), lr=1e-2)
    res = db.debias(cfg, backbone_max_steps=2, seeds=(0,), control=True)

    assert len(seen) == 4  # 2 tasks x (debias, plain upstream)
    for before, after, frozen, task in seen:
        assert before and before.keys() == after.keys() and all(frozen)
        for k in before:
            assert torch.equal(before[k], after[k]), k
        # the task adapter was injected beside it by the trainer; its B starts at zero
        assert task and any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in task.items()), \
            "the task adapter did not train"
    # and the frozen adapter still holds what the upstream run saved
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "db" / "seed0" / "upstream" / "adapter" / "adapter_model.safetensors"))
    k = next(k for k in saved if k.endswith("lora_B.weight"))
    layer = k[len("base_model.model."):-len(".lora_B.weight")]
    assert saved[k].abs().sum() > 0 and torch.equal(seen[0][1][f"{layer}.lora_B"], saved[k])

    arms = {(r["task"], r["arm"]): r for r in res["rows"]}
    assert set(arms) == {(t, a) for t in ("digits10", "digit_lt5") for a in ("baseline", "debias", "plain upstream")
                         } | {("digits10", "upstream only")}
    for t in ("digits10", "digit_lt5"):
        assert arms[(t, "debias")]["upstream_unchanged"] is True
        assert arms[(t, "plain upstream")]["upstream_unchanged"] is True
        assert arms[(t, "baseline")]["upstream_unchanged"] is None
    for r in res["rows"]:
        if r["counterfactual_flip"] is not None:
            assert 0.0 <= r["counterfactual_flip"] <= 1.0
    for f in ("results.csv", "results.json", "results.md", "bias.png"):
        assert (tmp_path / "db" / f).is_file(), f


def test_debias_on_csv_without_a_counterfactual_balances_groups_with_the_fairness_loss(tmp_path):
    import numpy as np
    import yaml
    from PIL import Image

    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,label,group,split"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{i % 2},{(i // 2) % 2},{'train' if i < 24 else ('val' if i < 32 else 'test')}")
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
    cfg = tiny(tmp_path, data="csv", csv_path=str(tmp_path / "meta.csv"), image_root=str(tmp_path),
               batch_size=8, output_dir=str(tmp_path / "db"))
    res = db.debias(cfg, backbone_max_steps=1, transfer_csv=str(tmp_path / "meta.csv"), seeds=(0,))
    assert {(r["task"], r["arm"]) for r in res["rows"]} == {
        ("task", "baseline"), ("task", "debias"), ("transfer", "baseline"), ("transfer", "debias"),
        ("task", "upstream only")}
    up = yaml.safe_load((tmp_path / "db" / "seed0" / "upstream" / "config.yaml").read_text())
    assert up["balanced_sampling"] is True and up["lam"] == 1.0
    assert all(r["counterfactual_flip"] is None for r in res["rows"])

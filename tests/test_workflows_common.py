"""The shared base of the workflows: deriving configs, seeds' summaries and ties, data pieces, and
the cached pre-trained backbone."""
import ast
import statistics
from pathlib import Path

import pytest
import torch

import fastfair.trainer as trainer
from fastfair.config import TrainConfig
from fastfair.data import ColoredDigits
from fastfair.workflows import common

TINY = dict(model="test_vit", img_size=16, patch_size=8, depth=2, batch_size=16, eval_batch_size=128,
            repeats=1, log_with=None, log_every=1, report_ci=False, warmup_steps=1)


def test_derive_validates_and_leaves_the_base_alone():
    base = TrainConfig(**TINY)
    d = common.derive(base, rank=16, lr="1e-3")
    assert (d.rank, d.lr, base.rank) == (16, 1e-3, TrainConfig.rank)
    d.exclude.append("head")
    d.rank_pattern["blocks.0.attn.qkv"] = 2
    assert "head" not in base.exclude and base.rank_pattern == {}
    with pytest.raises(ValueError, match="rank"):
        common.derive(base, rank=0)
    with pytest.raises(ValueError, match=r"\['no_such_key'\]"):
        common.derive(base, no_such_key=1)


def test_summarize_seeds_uses_the_sample_std():
    rows = [{"arm": "a", "m": v} for v in (0.2, 0.4, 0.9)] + [{"arm": "b", "m": 0.5}, {"arm": "b", "m": None}]
    a, b = common.summarize_seeds(rows, ("arm",), ("m",))
    assert a["m_std"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert a["m_std"] != pytest.approx(statistics.pstdev([0.2, 0.4, 0.9]))
    assert (b["m"], b["m_std"], b["n_seeds"]) == (0.5, None, 2)


@pytest.mark.parametrize("diff, spread, higher, want", [
    (0.05, 0.1, True, "tie"), (-0.05, 0.1, True, "tie"), (0.2, 0.1, True, "better"),
    (0.2, 0.1, False, "worse"), (-0.2, 0.1, True, "worse"), (0.2, None, True, "one seed"),
    (None, 0.1, True, "n/a")])
def test_verdict_calls_a_difference_within_the_seed_spread_a_tie(diff, spread, higher, want):
    assert common.verdict(diff, spread, higher) == want


def test_subset_and_half_split():
    ds = ColoredDigits("train", image_size=8, repeats=2)
    a, b = common.half_split(ds, seed=3)
    assert len(a) + len(b) == len(ds)
    src = torch.as_tensor(ds.source_index)
    assert not set(src[a].tolist()) & set(src[b].tolist())
    sub = common.Subset(ds, a[:5])
    assert len(sub) == 5 and torch.equal(sub.labels, torch.as_tensor(ds.labels)[a[:5]])
    assert torch.equal(sub[2][0], ds[int(a[2])][0])
    images, labels = common.stack_images(sub)
    assert images.shape[0] == 5 and torch.equal(labels, sub.labels)


def test_build_model_is_seeded_and_reheads_loaded_weights(tmp_path):
    cfg = TrainConfig(**TINY)
    m1, m2 = common.build_model(cfg, 3), common.build_model(cfg, 3)
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    from safetensors.torch import save_file

    source = common.build_model(common.derive(cfg, seed=5), 10).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "w.safetensors"))
    m = common.build_model(cfg, 2, tmp_path / "w.safetensors")
    assert m.get_classifier().out_features == 2
    assert torch.equal(m.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])


def test_predict_restores_the_training_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).train()
    x = torch.randn(7, 3, 2, 2)
    p = common.predict(model, x, batch_size=3)
    assert torch.equal(p, model(x).argmax(-1)) and model.training


def test_pretrained_backbone_is_trained_once_and_keyed_by_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFAIR_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = trainer.train

    def counted(cfg, **kw):
        calls.append(cfg)
        return real(cfg, **kw)

    monkeypatch.setattr(trainer, "train", counted)
    cfg = TrainConfig(**TINY)
    w = common.pretrained_backbone(cfg, max_steps=1)
    assert w.is_file() and w.is_relative_to(tmp_path / "cache") and len(calls) == 1
    pcfg = calls[0]
    assert (pcfg.finetune, pcfg.binary, pcfg.correlation, pcfg.data_seed) == ("full", False, 0.1, 0)
    assert (pcfg.img_size, pcfg.patch_size, pcfg.depth) == (16, 8, 2)  # the caller's architecture
    assert common.pretrained_backbone(cfg, max_steps=1) == w and len(calls) == 1  # reused
    assert not list((tmp_path / "cache" / "pretrain").glob("*.partial"))
    # --backbone pretrain: the weights and the pre-training's data seed
    derived = common.with_backbone(cfg, "pretrain", max_steps=1)
    assert (derived.checkpoint, derived.data_seed, len(calls)) == (str(w), 0, 1)
    # another pre-training config is another entry
    w2 = common.pretrained_backbone(common.derive(cfg, data_seed=1), max_steps=1)
    assert w2 != w and len(calls) == 2
    with pytest.raises(ValueError, match="--checkpoint"):
        common.with_backbone(common.derive(cfg, checkpoint=str(w)), "pretrain")


def test_no_workflow_imports_another():
    names = {"sweep", "tune", "debias", "bias_transfer"}
    pkg = Path(common.__file__).parent
    for name in names:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[-1])
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[-1] for a in node.names}
        assert not (imported & (names - {name})), (name, imported & names)


def test_backbone_pretrain_takes_the_docs_setup_where_the_user_gave_nothing(tmp_path, monkeypatch):
    from fastfair.workflows import sweep

    seen = []
    monkeypatch.setattr(common, "pretrained_backbone", lambda cfg, **kw: seen.append(cfg) or tmp_path / "w.safetensors")
    (tmp_path / "c.yaml").write_text("epochs: 5\n")
    args = sweep.build_parser().parse_args(["--backbone", "pretrain", "--config", str(tmp_path / "c.yaml"),
                                            "--lr", "0.01", "--patch-size", "4"])
    cfg = common.workflow_config(args)
    assert (cfg.epochs, cfg.lr, cfg.patch_size) == (5, 0.01, 4)  # the YAML and the flags win
    assert (cfg.img_size, cfg.repeats, cfg.batch_size, cfg.binary) == (16, 2, 64, True)  # the docs' $COMMON
    assert cfg.checkpoint == str(tmp_path / "w.safetensors") and cfg.data_seed == 0
    assert seen[0].patch_size == 4  # the backbone is pre-trained for the architecture fine-tuned
    plain = common.workflow_config(sweep.build_parser().parse_args(["--lr", "0.01"]))
    assert plain.img_size == TrainConfig.img_size and plain.checkpoint is None and len(seen) == 1


def test_paired_change_pairs_by_seed_and_match_keys():
    rows = [{"seed": s, "source": src, "mode": m, "asr": v} for s, src, m, v in [
        (0, "control", "lora", 0.10), (1, "control", "lora", 0.20), (2, "control", "lora", 0.30),
        (0, "triggered", "lora", 0.50), (1, "triggered", "lora", 0.62), (2, "triggered", "lora", 0.68),
        (0, "control", "full", 0.10), (1, "control", "full", 0.10),
        (0, "triggered", "full", 0.12), (1, "triggered", "full", 0.09),
        (3, "triggered", "full", 0.90)]]  # seed 3 has no control: left out, not paired with another seed
    out = common.paired_change(rows, "source", "control", ("mode",), "asr", higher_is_better=False)
    lora, full = out[("lora", "triggered")], out[("full", "triggered")]
    assert lora["per_seed"] == pytest.approx({0: 0.40, 1: 0.42, 2: 0.38})
    assert lora["std"] == pytest.approx(statistics.stdev([0.40, 0.42, 0.38]))
    assert lora["verdict"] == "worse"  # a higher ASR, beyond the spread
    assert set(full["per_seed"]) == {0, 1} and full["verdict"] == "tie"
    assert common.fmt_change(lora) == "+0.400 ± 0.020 (worse)" and common.fmt_change(None) == "-"

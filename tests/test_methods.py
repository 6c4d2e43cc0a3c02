"""fastfair.methods on tiny runs: each method end to end, JTT's error set, DFR's last-layer refit."""
import copy
from collections import Counter

import numpy as np
import pytest
import torch

from fastfair import methods, trainer
from fastfair.config import TrainConfig, load_config
from fastfair.losses import FairnessLoss


def tiny(tmp_path, **kw):
    base = dict(model="test_vit", img_size=16, patch_size=8, depth=1, rank=2, epochs=1, max_steps=3,
                batch_size=32, eval_batch_size=256, repeats=1, log_with=None, log_every=1,
                report_ci=False, output_dir=str(tmp_path / "run"), warmup_steps=1, lr=1e-2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def runs(monkeypatch):
    """Every trainer run a method starts: its config, its datasets, its backbone as passed in
    (a copy of the weights before training) and the backbone object itself (trained in place)."""
    seen = []
    real = trainer.train

    def watch(cfg, **kw):
        b = kw.get("backbone")
        rec = {"cfg": cfg, "datasets": kw.get("datasets"), "backbone": b,
               "init": None if b is None else copy.deepcopy(b.state_dict())}
        seen.append(rec)
        rec["result"] = real(cfg, **kw)
        rec["trained"] = None if b is None else copy.deepcopy(b.state_dict())
        return rec["result"]

    monkeypatch.setattr(trainer, "train", watch)
    return seen


@pytest.mark.parametrize("cfg_kw, match", [
    (dict(method="erm", lam=1.0), "lam=1.0 does not apply to method='erm'"),
    (dict(method="erm", balanced_sampling=True), "method=reweight"),
    (dict(method="groupdro", penalty="std"), "penalty='std' does not apply to method='groupdro'"),
    (dict(method="groupdro", lam=0.5), "method=fairlora penalty=worst"),
    (dict(method="reweight", lam=1.0), "lam=1.0 does not apply"),
    (dict(method="jtt", dfr_subsets=3), "dfr_subsets=3 does not apply to method='jtt'"),
    (dict(method="dfr", jtt_upweight=3.0), "jtt_upweight=3.0 does not apply"),
    (dict(method="fairlora", jtt_epochs=2), "jtt_epochs=2 does not apply"),
    (dict(method="jtt", jtt_upweight=2.5), "whole number"),
    (dict(method="jtt", jtt_epochs=0), "jtt_epochs must be an integer >= 1"),
    (dict(method="mixup"), "method must be one of"),
])
def test_flags_that_do_not_apply_are_errors_before_anything_runs(tmp_path, runs, cfg_kw, match):
    with pytest.raises(ValueError, match=match):
        methods.run(tiny(tmp_path, **cfg_kw))
    assert runs == [] and not (tmp_path / "run").exists()


def test_dro_penalty_at_lam_one_is_the_groupdro_objective():
    torch.manual_seed(0)
    G, step = 3, 0.5
    logits = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    labels, groups = torch.randint(0, 2, (12,)), torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    fn = FairnessLoss(G, lam=1.0, penalty="dro", step_size=step, backend="torch")
    out = fn(logits, labels, groups)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    L = torch.stack([ce[groups == g].mean() for g in range(G)])
    q = torch.full((G,), 1 / G, dtype=torch.float64) * torch.exp(step * L.detach())
    q = q / q.sum()
    expected = (q * L).sum()  # Sagawa et al.: Σ q_g L_g with the weights updated first
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(torch.autograd.grad(out.loss, logits)[0], torch.autograd.grad(expected, logits)[0])
    torch.testing.assert_close(fn.dro_q.double(), q)


@pytest.mark.parametrize("name, cfg_kw, expect", [
    ("erm", {}, dict(lam=0.0, penalty="none", balanced_sampling=False)),
    ("fairlora", dict(lam=1.0, penalty="std"), dict(lam=1.0, penalty="std")),
    ("groupdro", dict(dro_step_size=0.1), dict(lam=1.0, penalty="dro", dro_step_size=0.1)),
    ("reweight", {}, dict(lam=0.0, penalty="none", balanced_sampling=True)),
])
def test_one_run_methods_end_to_end(tmp_path, runs, name, cfg_kw, expect):
    res = methods.run(tiny(tmp_path, method=name, **cfg_kw))
    assert len(runs) == 1
    for key, value in expect.items():
        assert getattr(runs[0]["cfg"], key) == value, key
    assert set(res) >= {"output_dir", "val", "test"} and 0 <= res["test"]["accuracy"] <= 1
    # the run's saved config (the method's own settings in it) passes the method's check again
    methods.check(load_config(tmp_path / "run" / "config.yaml"), methods.METHODS[name])


def test_jtt_upweights_exactly_the_erm_errors_and_restarts_from_the_same_init(tmp_path, runs):
    cfg = tiny(tmp_path, method="jtt", jtt_epochs=1, jtt_upweight=3.0, max_steps=4)
    res = methods.run(cfg)
    first, second = runs
    assert first["cfg"].method == "erm" and first["cfg"].epochs == 1 and first["cfg"].output_dir.endswith("identify")
    # the identification model's own predictions on the training set, recomputed here
    train_ds = first["datasets"]["train"]
    model = copy.deepcopy(first["backbone"])
    model.load_state_dict(first["trained"])
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(torch.stack([train_ds[i][0] for i in range(s, min(s + 256, len(train_ds)))])).argmax(-1)
                           for s in range(0, len(train_ds), 256)])
    wrong = set((preds != torch.as_tensor(train_ds.labels)).nonzero().flatten().tolist())
    assert 0 < len(wrong) < len(train_ds), "a degenerate stage one makes this test vacuous"
    assert set(res["jtt"]["errors"]) == wrong
    upsampled = second["datasets"]["train"]
    counts = Counter(upsampled.indices.tolist())
    assert set(counts) == set(range(len(train_ds)))
    assert all(counts[i] == (3 if i in wrong else 1) for i in counts)
    assert torch.equal(torch.as_tensor(upsampled.labels), torch.as_tensor(train_ds.labels)[upsampled.indices])
    # stage two starts from stage one's initialization, not from its trained weights
    assert first["init"].keys() == second["init"].keys()
    assert all(torch.equal(first["init"][k], second["init"][k]) for k in first["init"])
    assert (tmp_path / "run" / "jtt_errors.json").is_file() and (tmp_path / "run" / "report.json").is_file()


def test_dfr_refits_only_the_last_layer_on_balanced_validation_rows(tmp_path, runs, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    fitted = []
    real_fit = LogisticRegression.fit

    def fit(self, X, y, *a, **k):
        fitted.append(np.array(y))
        return real_fit(self, X, y, *a, **k)

    monkeypatch.setattr(LogisticRegression, "fit", fit)
    res = methods.run(tiny(tmp_path, method="dfr", max_steps=4))
    (stage1,) = runs  # one trainer run: the features; the head refit trains nothing else
    after = stage1["backbone"].state_dict()
    changed = {k for k in after if not torch.equal(after[k], stage1["trained"][k])}
    assert changed == {"head.weight", "head.bias"}
    info = res["dfr"]
    val = stage1["datasets"]["val"]
    groups, labels = torch.as_tensor(val.groups).numpy(), torch.as_tensor(val.labels).numpy()
    a, b = set(info["half_a"]), set(info["half_b"])
    assert not a & b and a | b == set(range(len(val)))
    assert len(info["subsets"]) == info["n_subsets"] > 1
    for rows in info["subsets"]:
        assert set(rows) <= a and len(set(rows)) == len(rows)
        per_group = Counter(groups[rows].tolist())
        assert set(per_group) == set(groups.tolist()) and len(set(per_group.values())) == 1
    # the logistic regressions saw validation labels at exactly those rows (each C draws the same subsets)
    for y, rows in zip(fitted, info["subsets"]):
        assert np.array_equal(y, labels[rows])
    assert len(fitted) == info["n_subsets"] * len(TrainConfig().dfr_c_grid)
    assert sum(res["val"]["group_count"]) == len(b)  # "val" is the tuning half, not the fitting one
    assert (tmp_path / "run" / "dfr_head.safetensors").is_file() and (tmp_path / "run" / "report.json").is_file()


def test_main_job_table_has_sample_std_seed_count_and_paired_ties():
    from fastfair.workflows.main_job import table

    def row(method, seed, wga):
        return {"method": method, "seed": seed, "accuracy": 0.5, "worst_group_accuracy": wga, "accuracy_gap": 0.1}

    rows = [row("erm", s, w) for s, w in enumerate((0.0, 0.1, 0.2))]
    rows += [row("fairlora", s, w) for s, w in enumerate((0.5, 0.7, 0.6))]  # +0.5, +0.6, +0.4
    rows += [row("groupdro", s, w) for s, w in enumerate((0.05, 0.05, 0.25))]  # +0.05, -0.05, +0.05
    lines = {line.split(" | ")[0].strip("| "): line for line in table(rows).splitlines()[2:]}
    assert "| 3 | 0.500 ± 0.000 | 0.100 ± 0.100 |" in lines["ERM"]  # sample std of 0, .1, .2
    assert lines["FairLoRA (λ=1)"].endswith("| 0.500 ± 0.100 | better |")
    assert lines["GroupDRO"].endswith("| 0.017 ± 0.058 | tie |")

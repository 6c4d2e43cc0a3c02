"""`fastfair sweep` and `fastfair tune` end to end on (subsets of) the colored-digits benchmark."""
import csv
import json
import statistics

import optuna
import pytest
import torch
from optuna.trial import TrialState

import fastfair.trainer as trainer
from fastfair.config import TrainConfig, load_config
from fastfair.data import ColoredDigits
from fastfair.inject import lora_layers
from fastfair.models import create_backbone, setup_finetuning
from fastfair.report import pareto_front
from fastfair.workflows import sweep as sweep_mod
from fastfair.workflows import tune as tune_mod

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = dict(model="test_vit", img_size=16, patch_size=8, depth=2, rank=4, batch_size=16,
            eval_batch_size=128, repeats=1, log_with=None, log_every=1, report_ci=False,
            warmup_steps=1, binary=True)
TINY_FLAGS = ["--model", "test_vit", "--img-size", "16", "--patch-size", "8", "--depth", "2",
              "--batch-size", "16", "--eval-batch-size", "128", "--repeats", "1", "--log-with", "null",
              "--report-ci", "false", "--warmup-steps", "1", "--binary", "true", "--epochs", "1",
              "--max-steps", "2"]


class Head(torch.utils.data.Dataset):
    """The first ``n`` items of a colored-digits split, with the attributes the trainer reads."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n
        for a in ("num_classes", "num_groups", "group_names", "class_names"):
            setattr(self, a, getattr(ds, a))
        self.labels, self.groups, self.attributes = ds.labels[:n], ds.groups[:n], ds.attributes[:n]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


@pytest.fixture(scope="module")
def small():
    """64 images per split: two steps per epoch at batch 32, so epochs (and pruning) are cheap."""
    return {s: Head(ColoredDigits(s, binary=True, image_size=16), 64) for s in ("train", "val", "test")}


def base(tmp_path, **kw):
    return TrainConfig(**{**TINY, "output_dir": str(tmp_path / "unused"), **kw})


def count_train_calls(monkeypatch, fail_on=None):
    calls = []
    real = trainer.train

    def wrapped(cfg, *a, **k):
        calls.append(cfg.output_dir)
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("killed mid-trial")
        return real(cfg, *a, **k)

    monkeypatch.setattr(trainer, "train", wrapped)
    return calls


# --- sweep -------------------------------------------------------------------------------------

def test_sweep_cli_end_to_end_and_resume(tmp_path, small, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["--ranks", "1,4", "--lams", "1", "--penalties", "variance", "--group-keys", "class",
            "--seeds", "0", "--data-seed", "3", "--output-dir", str(out), *TINY_FLAGS]
    seeds = []
    # --data-seed builds the data once; the small subset keeps the evaluations cheap
    monkeypatch.setattr(trainer, "build_datasets_for", lambda cfg: seeds.append(cfg.data_seed) or small)
    calls = count_train_calls(monkeypatch)
    assert sweep_mod.main(argv) == 0
    assert len(calls) == 2 and seeds == [3]
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["rank"], r["lam"], r["penalty"], r["loss_groups"]) for r in rows] == [
        ("1", "1.0", "variance", "class"), ("4", "1.0", "variance", "class")]
    for r in rows:
        run = out / r["run"]
        assert load_config(run / "config.yaml").rank == int(r["rank"])
        assert load_config(run / "config.yaml").loss_groups == "class"
        # the table holds the run's own final metrics, on both splits
        res = json.loads((run / "result.json").read_text())
        assert float(r["test/accuracy"]) == pytest.approx(res["test"]["accuracy"])
        assert 0.0 <= float(r["val/worst_group_accuracy"]) <= 1.0
    assert (out / "pareto.png").stat().st_size > 0
    compared = json.loads((out / "compare" / "compare.json").read_text())
    assert "r1_lam1_variance_class_s0" in json.dumps(compared)
    assert "rank 1" in (out / "summary.md").read_text() and (out / "sweep.md").is_file()

    # a finished sweep trains nothing; a point without its result (killed) is trained again
    (out / rows[1]["run"] / "result.json").unlink()
    assert sweep_mod.main(argv) == 0
    assert calls[2:] == [str(out / rows[1]["run"])]
    # a changed base config must not silently reuse the old runs
    with pytest.raises(ValueError, match="another config"):
        sweep_mod.main(argv + ["--lr", "0.01"])


def test_sweep_grid_collapses_erm_and_rejects_bad_values():
    pts = sweep_mod.grid([1, 4], [0.0, 1.0], ["variance", "worst"], ["group", "class"], [0, 1])
    erm = [p for p in pts if p.lam == 0]
    assert len(erm) == 2 * 2  # one per (rank, seed), whatever the penalty and group key
    assert len(pts) == 4 + 2 * 2 * 2 * 2
    assert len({p.name for p in pts}) == len(pts)
    with pytest.raises(ValueError, match="'bogus'"):
        sweep_mod.grid([1], [1.0], ["bogus"], ["group"], [0])
    with pytest.raises(ValueError, match="-1"):
        sweep_mod.grid([1], [-1.0], ["variance"], ["group"], [0])
    with pytest.raises(ValueError, match="'colour'"):
        sweep_mod.grid([1], [1.0], ["variance"], ["colour"], [0])


def test_summarize_best_rank_per_setting():
    def row(rank, lam, seed, v):
        return {"run": "x", "rank": rank, "lam": lam, "penalty": "variance" if lam else "none",
                "loss_groups": "group" if lam else "-", "seed": seed, "test/accuracy_gap": v}

    # lower gap is better: ERM is best at rank 4, FairLoRA at rank 1 -> not universal
    rows = [row(1, 0, 0, 0.5), row(4, 0, 0, 0.2), row(1, 1, 0, 0.1), row(4, 1, 0, 0.3),
            row(1, 0, 1, 0.5), row(4, 0, 1, 0.2), row(1, 1, 1, 0.1), row(4, 1, 1, 0.3)]
    text = sweep_mod.summarize(rows, "accuracy_gap", "test")
    lines = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| ")}
    assert lines["ERM"].split("|")[-4].strip() == "4"
    fair = lines["fairlora λ=1 variance group"]
    assert fair.split("|")[-4].strip() == "1"
    assert "(-0.4000)" in fair  # change against ERM at rank 1: 0.1 - 0.5
    assert "no single rank is best everywhere" in text
    same = [r for r in rows if r["rank"] == 4] + [dict(r, **{"test/accuracy_gap": 0.9})
                                                   for r in rows if r["rank"] == 1]
    assert "Rank 4 is best in every setting" in sweep_mod.summarize(same, "accuracy_gap", "test")
    # ERM tied across ranks leaves one informative setting: no claim either way
    tied = [dict(r, **{"test/accuracy_gap": 1.0}) if r["lam"] == 0 else r for r in rows]
    text = sweep_mod.summarize(tied, "accuracy_gap", "test")
    assert "Only one setting tells the ranks apart (best rank 1)" in text
    assert "universal" not in text.replace("is universal cannot", "")


def test_pareto_front_directions():
    pts = [(0.9, 0.1), (0.8, 0.05), (0.7, 0.2), (0.9, 0.3), (None, 0.0)]
    assert pareto_front(pts, (True, False)) == [0, 1]
    assert pareto_front(pts, (True, True)) == [3]


# --- tune: trial -> config ---------------------------------------------------------------------

def test_trial_config_lora_blocks_and_ranks(tmp_path):
    params = {"block0": "frozen", "block1": "attn", "rank1": 4, "block2": "both", "rank2": 16, "lr": 3e-4}
    cfg = tune_mod.trial_config(base(tmp_path, depth=3), params, 3, tmp_path / "t")
    assert cfg.finetune == "lora" and cfg.lr == 3e-4 and cfg.trainable == ["head"]
    assert cfg.targets == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.2.attn.qkv",
                           "blocks.2.attn.proj", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]
    assert cfg.rank_pattern == {"blocks.1.attn.qkv": 4, "blocks.1.attn.proj": 4, "blocks.2.attn.qkv": 16,
                                "blocks.2.attn.proj": 16, "blocks.2.mlp.fc1": 16, "blocks.2.mlp.fc2": 16}
    model = create_backbone(cfg, num_classes=2)
    setup_finetuning(model, cfg)
    ranks = {n: m.lora_A["default"].shape[0] for n, m in lora_layers(model).items()}
    assert ranks == cfg.rank_pattern
    trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("blocks.0.") for n in trained)  # the frozen block gets nothing
    assert "head" in trained


def test_trial_config_full_and_all_frozen(tmp_path):
    params = {"block0": "full_norm", "block1": "frozen", "lr": 1e-3}
    cfg = tune_mod.trial_config(base(tmp_path), params, 2, tmp_path / "t")
    assert cfg.finetune == "linear" and cfg.targets == [] and cfg.rank_pattern == {}
    assert cfg.trainable == ["head", "blocks.0.norm1", "blocks.0.norm2"]
    model = create_backbone(cfg, num_classes=2)
    setup_finetuning(model, cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
                       "blocks.0.norm2.weight", "blocks.0.norm2.bias"}
    mixed = tune_mod.trial_config(base(tmp_path), {"block0": "full_block", "block1": "mlp", "rank1": 2,
                                                   "lr": 1e-3}, 2, tmp_path / "t")
    assert mixed.finetune == "lora" and mixed.trainable == ["head", "blocks.0"]
    assert mixed.targets == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    with pytest.raises(ValueError, match="rank0"):
        tune_mod.trial_config(base(tmp_path), {"block0": "attn", "block1": "frozen", "lr": 1e-3}, 2, tmp_path)
    with pytest.raises(ValueError, match="'sideways'"):
        tune_mod.trial_config(base(tmp_path), {"block0": "sideways", "block1": "frozen", "lr": 1e-3}, 2, tmp_path)


def test_search_space_and_objective_directions():
    trial = optuna.trial.FixedTrial({"block0": "frozen", "block1": "mlp", "rank1": 8, "lr": 1e-4})
    assert tune_mod.suggest_params(trial, 2) == {"block0": "frozen", "block1": "mlp", "rank1": 8, "lr": 1e-4}
    assert tune_mod.directions(["worst_group_accuracy", "accuracy_gap", "max_group_loss", "auc"]) == [
        "maximize", "minimize", "minimize", "maximize"]
    with pytest.raises(ValueError, match="'fairness'"):
        tune_mod.directions(["fairness"])
    val = {"accuracy": 0.8, "group_loss": [0.2, None, 1.5], "worst_group_auc": None}
    assert tune_mod.objective_value(val, "max_group_loss") == 1.5
    assert tune_mod.objective_value(val, "accuracy") == 0.8
    assert tune_mod.objective_value(val, "worst_group_auc") != tune_mod.objective_value(val, "worst_group_auc")


# --- tune: studies -----------------------------------------------------------------------------

def test_tune_end_to_end_resumes_without_repeating(tmp_path, small, monkeypatch):
    out = tmp_path / "tune"
    cfg = base(tmp_path, epochs=1, batch_size=32)
    calls = count_train_calls(monkeypatch)
    first = tune_mod.tune(cfg, out, n_trials=2, objectives=["accuracy_gap"], pruner="none",
                          datasets=small, retrain=False)
    assert len(calls) == 2
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    best_gap = min(t.value for t in study.trials)
    assert first["best_values"] == [best_gap]

    res = tune_mod.tune(cfg, out, n_trials=3, objectives=["accuracy_gap"], pruner="none",
                        datasets=small, retrain=True)
    assert len(calls) == 2 + 1 + 1  # one new trial, then the stage-two retraining
    assert calls[2].endswith("trial_0002") and calls[3] == str(out / "best")
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    best = load_config(out / "best_config.yaml")
    assert best == res["best_config"] and best.output_dir == str(out / "best")
    assert best.lr == study.best_trial.params["lr"]
    assert (out / "best" / "predictions_test.npz").is_file() and "test" in res["final"]
    with (out / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["number"] for r in table] == ["0", "1", "2"]
    assert float(table[0]["accuracy_gap"]) == pytest.approx(study.trials[0].value)
    # the objective is the final pooled validation metric of the trial's run
    assert study.trials[0].value == pytest.approx(study.trials[0].user_attrs["val/accuracy_gap"])
    # summary.md: the best trial, optuna's importances of the sampled parameters, stage two on test
    summary = (out / "summary.md").read_text()
    assert f"## Best trial: #{study.best_trial.number}" in summary
    assert f"| validation accuracy_gap | {study.best_value:.4f} |" in summary
    imp = summary.split("## Parameter importance")[1].split("##")[0]
    assert "| lr |" in imp or "Not computed" in imp
    assert f"| accuracy | {res['final']['test']['accuracy']:.4f} |" in summary
    assert (out / "study.png").stat().st_size > 0


def test_tune_killed_trial_is_not_counted(tmp_path, small, monkeypatch):
    out = tmp_path / "tune"
    cfg = base(tmp_path, epochs=1, batch_size=32)
    calls = count_train_calls(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="killed"):
        tune_mod.tune(cfg, out, n_trials=2, pruner="none", datasets=small, retrain=False)
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    # a hard kill leaves a RUNNING trial behind: it must be failed on resume, not counted
    study.ask()
    calls.clear()
    tune_mod.tune(cfg, out, n_trials=2, pruner="none", datasets=small, retrain=False)
    assert calls == [str(out / "trials" / "trial_0003")]
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                               TrialState.COMPLETE]


def test_tune_prunes_per_epoch(tmp_path, small):
    out = tmp_path / "tune"
    cfg = base(tmp_path, epochs=3, batch_size=32)
    # worst-group accuracy never reaches 2: every trial is pruned at its first report
    with pytest.raises(ValueError, match="no trial"):
        tune_mod.tune(cfg, out, n_trials=1, pruner=optuna.pruners.ThresholdPruner(lower=2.0),
                      datasets=small, retrain=False)
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    (t,) = study.trials
    assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [0]
    epochs = (out / "trials" / "trial_0000" / "metrics.jsonl").read_text().splitlines()
    assert len(epochs) == 1  # stopped after the first of three epochs


def test_tune_two_objectives_nsga2(tmp_path, small):
    out = tmp_path / "tune"
    res = tune_mod.tune(base(tmp_path, epochs=1, batch_size=32), out, n_trials=2,
                        objectives=["accuracy", "accuracy_gap"], datasets=small, retrain=False,
                        population_size=2)
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert len(res["best_values"]) == 2
    assert tuple(res["best_values"]) in {tuple(t.values) for t in study.best_trials}
    assert (out / "study.png").stat().st_size > 0  # the trials' Pareto front
    # another objective on the same study directory is refused, not mixed in
    with pytest.raises(ValueError, match="settings"):
        tune_mod.tune(base(tmp_path, epochs=1, batch_size=32), out, n_trials=3,
                      objectives=["accuracy"], datasets=small, retrain=False)


def test_tune_cli_on_the_benchmark(tmp_path):
    out = tmp_path / "tune"
    assert tune_mod.main(["--n-trials", "2", "--ranks", "2,4", "--output-dir", str(out), *TINY_FLAGS,
                          "--no-retrain"]) == 0
    cfg = load_config(out / "best_config.yaml")
    assert cfg.max_steps == 2 and cfg.model == "test_vit"
    assert set(cfg.rank_pattern.values()) <= {2, 4}


# --- methods side by side ----------------------------------------------------------------------

def method_row(setting, seed, wga, acc=0.5, rank=4):
    method = setting.split()[0]
    return {"run": f"{setting}_{seed}", "method": method, "setting": setting, "rank": rank,
            "lam": 1.0 if method == "fairlora" else 0.0, "penalty": "none", "loss_groups": "-", "seed": seed,
            "test/accuracy": acc, "test/worst_group_accuracy": wga, "test/accuracy_gap": 1 - wga,
            "test/equalized_odds_difference": 1 - wga}


def test_method_summary_is_paired_against_erm_with_the_sample_std_and_ties():
    erm = [0.10, 0.20, 0.30]
    rows = [method_row("erm", s, v) for s, v in enumerate(erm)]
    rows += [method_row("jtt", s, v + d) for s, (v, d) in enumerate(zip(erm, (0.30, 0.32, 0.34)))]
    rows += [method_row("dfr", s, v + d) for s, (v, d) in enumerate(zip(erm, (0.05, -0.04, 0.02)))]
    by = {s["setting"]: s for s in sweep_mod.summarize_methods(rows)}
    assert list(by) == ["erm", "jtt", "dfr"]  # ERM first
    assert by["erm"]["worst_group_accuracy_std"] == pytest.approx(statistics.stdev(erm))  # sample std
    jtt = by["jtt"]["vs_erm/worst_group_accuracy"]
    assert jtt["per_seed"] == pytest.approx({0: 0.30, 1: 0.32, 2: 0.34})
    assert jtt["mean"] == pytest.approx(0.32) and jtt["std"] == pytest.approx(0.02)
    assert jtt["verdict"] == "better"
    # +0.01 on average against a spread of 0.045: within the seed spread, so a tie
    assert by["dfr"]["vs_erm/worst_group_accuracy"]["verdict"] == "tie"
    assert by["erm"]["vs_erm/worst_group_accuracy"] is None
    table = sweep_mod.methods_table(list(by.values()))
    assert "| jtt | 3 |" in table and "+0.320 ± 0.020 (better)" in table and "(tie)" in table
    assert "seed spread" in table
    one_seed = sweep_mod.summarize_methods([r for r in rows if r["seed"] == 0])
    assert {s["setting"]: s["vs_erm/worst_group_accuracy"] for s in one_seed}["jtt"]["verdict"] == "one seed"


def test_sweep_grid_takes_methods_as_an_axis():
    pts = sweep_mod.grid([4], [0.0, 1.0], ["variance"], ["group"], [0, 1], ["erm", "fairlora", "jtt"])
    assert sorted((p.method, p.seed) for p in pts) == [(m, s) for m in ("erm", "fairlora", "jtt") for s in (0, 1)]
    assert {p.name for p in pts if p.method == "jtt"} == {"r4_jtt_s0", "r4_jtt_s1"}
    base = TrainConfig(**TINY, lam=2.0, penalty="worst")
    cfg = sweep_mod.point_config(base, next(p for p in pts if p.method == "jtt"), "/tmp/x")
    # a method key the method would ignore is back at its default (fastfair.methods refuses it)
    assert (cfg.method, cfg.lam, cfg.penalty, cfg.rank) == ("jtt", 0.0, TrainConfig.penalty, 4)
    fair = sweep_mod.point_config(base, next(p for p in pts if p.method == "fairlora"), "/tmp/x")
    assert (fair.lam, fair.penalty) == (1.0, "variance")
    with pytest.raises(ValueError, match="'bogus'"):
        sweep_mod.grid([4], [1.0], ["variance"], ["group"], [0], ["bogus"])


def test_compare_methods_end_to_end(tmp_path, small, monkeypatch, capsys):
    calls = count_train_calls(monkeypatch)
    cfg = base(tmp_path, epochs=1, max_steps=2, batch_size=32, lam=0.0)
    res = sweep_mod.compare_methods(cfg, ["fairlora", "jtt"], [0, 1], tmp_path / "m", datasets=small)
    assert len(calls) == 8  # ERM is added: 3 methods x 2 seeds, and JTT trains twice per seed
    methods = [load_config(tmp_path / "m" / r["run"] / "config.yaml").method for r in res["rows"]]
    assert sorted(methods) == ["erm", "erm", "fairlora", "fairlora", "jtt", "jtt"]
    fair = next(r for r in res["rows"] if r["method"] == "fairlora")
    assert fair["lam"] == 1.0  # the config's lam is 0: FairLoRA takes 1
    assert [s["setting"].split()[0] for s in res["summary"]] == ["erm", "fairlora", "jtt"]
    assert all(s["n_seeds"] == 2 for s in res["summary"])
    out = capsys.readouterr().out
    assert "[methods 1/6] erm, rank 4, seed 0" in out and "| jtt | 2 |" in out
    for f in ("methods.md", "methods.json", "methods.png"):
        assert (tmp_path / "m" / f).stat().st_size > 0
    # a second call reuses every finished run
    sweep_mod.compare_methods(cfg, ["fairlora", "jtt"], [0, 1], tmp_path / "m", datasets=small)
    assert len(calls) == 8


@pytest.mark.parametrize("module", ["sweep", "tune", "debias", "bias_transfer"])
def test_workflow_help_parses_before_heavy_imports_and_shows_defaults(module):
    import subprocess
    import sys

    code = (f"import sys; from fastfair.workflows import {module} as m; text = m.build_parser().format_help(); "
            "heavy = sorted(k for k in ('torch', 'timm', 'matplotlib', 'optuna') if k in sys.modules); "
            "print(heavy); print(text)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "[]", out.splitlines()[0]
    assert "--backbone {config,pretrain}" in out and "--learning-rate" not in out
    assert "(default:" in out
    expected = {"sweep": "default: 1,4,16,64", "tune": "(default: 20)", "debias": "(default: 8)",
                "bias_transfer": "(default: linear,lora:1"}[module]
    assert expected in " ".join(out.split())


def test_tune_compares_with_the_base_config_and_with_it_at_the_tuned_lr(tmp_path, small, monkeypatch):
    # The study tunes the learning rate as well: without the base config at the tuned rate, a gain
    # cannot be credited to the choice of parameters.
    out = tmp_path / "tune"
    cfg = base(tmp_path, epochs=1, batch_size=32)
    calls = count_train_calls(monkeypatch)
    res = tune_mod.tune(cfg, out, n_trials=2, objectives=["accuracy_gap"], pruner="none", datasets=small,
                        compare_baseline=True)
    assert calls[-3:] == [str(out / "best"), str(out / "baseline"), str(out / "baseline_tuned_lr")]
    tuned_lr = res["best_config"].lr
    assert load_config(out / "baseline_tuned_lr" / "config.yaml").lr == tuned_lr
    assert load_config(out / "baseline" / "config.yaml").lr == cfg.lr != tuned_lr
    summary = (out / "summary.md").read_text()
    assert "base config (baseline/)" in summary and "base config at the tuned lr (baseline_tuned_lr/)" in summary
    gap = res["final"]["test"]["accuracy_gap"] - res["baseline_tuned_lr"]["test"]["accuracy_gap"]
    assert f"{gap:+.4f}" in summary

"""TrainConfig: one source for flags, help text and validation; every bad value named before a run."""
import argparse
import dataclasses
import math

import pytest
from hypothesis import given, settings, strategies as st

from fastfair.config import (FIELDS, TrainConfig, add_config_arguments, config_from_args, flag, load_config)


def parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_config_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_every_field_is_a_documented_flag():
    p = argparse.ArgumentParser(prog="x")
    add_config_arguments(p)
    text = " ".join(p.format_help().split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert f"--{flag(f.name)}" in text, f.name
    assert "choices: stop, skip" in text and "range: (0, inf)" in text and "default: 0.003" in text


@pytest.mark.parametrize("key", ["lr", "alpha", "lam", "weight_decay", "penalty_alpha", "dro_step_size",
                                 "correlation", "jtt_upweight", "min_lr_ratio"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_must_be_finite(key, value):
    with pytest.raises(ValueError, match=f"{key} must be finite"):
        TrainConfig(**{key: value}).validate()


@given(st.sampled_from([f for f in FIELDS.values() if f.metadata["range"] is not None]),
       st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
@settings(max_examples=60, deadline=None)
def test_ranges_accept_exactly_their_interval(f, x):
    value = round(x) if isinstance(f.default, int) or f.default is None else x
    if f.name in ("img_size", "patch_size", "image_size"):
        return  # their multiple-of-patch rule is tested below
    inside = value in f.metadata["range"]
    if inside:
        TrainConfig(**{f.name: value}).validate()
    else:
        with pytest.raises(ValueError, match=f"{f.name} must be in"):
            TrainConfig(**{f.name: value}).validate()


@pytest.mark.parametrize("key, value, message", [
    ("penalty", "varaince", "penalty must be one of"), ("backend", "cuda", "backend must be one of"),
    ("finetune", "half", "finetune must be one of"), ("binary", 2, "binary must be bool, got 2"),
    ("epochs", 2.5, "epochs must be int"), ("attn", "xformers", "attn must be one of"),
    ("lr", "fast", "lr must be a number, got 'fast'"), ("img_size", 17, "image size 17 is not a multiple"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value}).validate()


def test_yaml_floats_and_flags_coerce_in_one_place(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nlam: 1\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.lr == 1e-3 and isinstance(cfg.lam, float)
    cfg = parse("--lr", "2e-4", "--overwrite", "--targets", "[qkv]")
    assert cfg.lr == 2e-4 and cfg.overwrite is True and cfg.targets == ["qkv"]
    with pytest.raises(SystemExit):
        parse("--lr", "inf")


@pytest.mark.parametrize("argv, name", [
    (["--csv-path", "x.csv"], "--csv-path"),
    (["--finetune", "linear", "--rank", "4"], "--rank"),
    (["--finetune", "full", "--int8", "true"], "--int8"),
    (["--data", "csv", "--csv-path", "m.csv", "--correlation", "0.5"], "--correlation"),
    (["--penalty", "worst", "--penalty-alpha", "0.2"], "--penalty-alpha"),
])
def test_flags_that_do_not_apply_are_refused_by_name(argv, name):
    with pytest.raises(ValueError, match=f"{name} does not apply"):
        parse(*argv)


def test_a_config_file_counts_as_given(tmp_path):
    (tmp_path / "c.yaml").write_text("finetune: linear\nrank: 4\n")
    with pytest.raises(ValueError, match="--rank does not apply"):
        parse("--config", str(tmp_path / "c.yaml"))
    assert load_config(tmp_path / "c.yaml").rank == 4  # a run's own config.yaml is not checked


def test_replace_validates_and_save_keeps_only_the_run(tmp_path):
    cfg = TrainConfig().replace(lam=2.0, overwrite=True)
    assert cfg.lam == 2.0
    with pytest.raises(ValueError, match="lam must be in"):
        cfg.replace(lam=-1.0)
    cfg.save(tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "lam: 2.0" in text and "overwrite" not in text and "resume_without_rng_state" not in text


def test_choice_lists_match_the_modules_they_name():
    from fastfair import backend, config, losses

    assert config.PENALTIES == losses.PENALTIES and config.BACKENDS == backend.BACKENDS

"""Training configuration: one dataclass, read from a YAML file with command-line flags over it."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # model
    # The defaults are the embedded CPU demo: timm's tiny test ViT (6 blocks, width 64) at 32 px
    # with 16 px patches (4 tokens), which LoRA can fit from random init in a few hundred steps.
    model: str = "test_vit"
    pretrained: bool = False  # load timm's weights (needs internet); tests never do
    checkpoint: str | None = None  # local weights file (.safetensors / .pt / .pth) for the backbone
    img_size: int | None = 32  # None keeps the model's own
    patch_size: int | None = 16
    depth: int | None = None  # None keeps the model's own
    model_kwargs: dict = field(default_factory=dict)
    attn: str = "sdpa"  # "sdpa" or "xformers" (CUDA only)
    # what is trained
    finetune: str = "lora"  # "lora", "full" (every parameter) or "linear" (the head alone)
    targets: list | str = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    exclude: list | str = field(default_factory=list)
    trainable: list = field(default_factory=lambda: ["head"])
    rank: int = 8
    adapter_name: str = "default"
    alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    int8: bool = False  # store the frozen backbone as bitsandbytes int8
    backend: str = "auto"
    # fairness loss
    lam: float = 0.0
    penalty: str = "variance"
    loss_groups: str = "group"  # "group" (the dataset's groups), "class" or "attribute"
    penalty_alpha: float = 0.5  # cvar fraction
    dro_step_size: float = 0.01
    label_smoothing: float = 0.0
    # optimization
    epochs: int = 8
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs)
    batch_size: int = 64
    eval_batch_size: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    balanced_sampling: bool = False
    # method (issue 14): what the run does about groups; see fastfair.methods
    method: str = "fairlora"  # "erm", "fairlora", "groupdro", "reweight", "jtt", "dfr"
    jtt_epochs: int = 1  # JTT: epochs of the identification (ERM) run
    jtt_upweight: float = 5.0  # JTT: how many times each error of that run is repeated
    dfr_epochs: int = 20  # DFR: epochs of last-layer retraining on the balanced validation half
    dfr_lr: float = 1e-2  # DFR: learning rate of the last-layer retraining
    select_by: str | None = "auto"  # validation metric that picks the kept epoch; "auto":
    # worst_group_accuracy when groups exist, null: the last epoch
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    seed: int = 0
    data_seed: int | None = None  # the data split and colors; null: the same as seed
    # data
    data: str = "colored_digits"
    correlation: float = 0.95
    binary: bool = True  # digit < 5 with two colors: 4 groups, large enough to read
    repeats: int = 2
    csv_path: str | None = None
    image_root: str | None = None
    path_col: str = "path"
    label_col: str = "label"
    group_col: str = "group"
    split_col: str = "split"
    image_size: int | None = None  # CSV images are resized to this; defaults to img_size
    num_workers: int = 0
    verify_images: str = "auto"  # "full", "sample", "none"; auto: full under 100k images
    allow_outside_root: bool = False  # accept CSV paths that leave image_root
    # output
    output_dir: str = "runs/default"
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: str | None = "tensorboard"  # accelerate tracker, or None
    report_ci: bool = True  # bootstrap intervals in the final report
    n_boot: int = 200

    def validate(self) -> "TrainConfig":
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hints[f.name] is float and isinstance(v, (str, int)) and not isinstance(v, bool):
                try:  # YAML 1.1 reads '1e-3' (no dot) as a string
                    setattr(self, f.name, float(v))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {v!r}") from None
        choices = {"finetune": ("lora", "full", "linear"), "attn": ("sdpa", "xformers"),
                   "loss_groups": ("group", "class", "attribute"),
                   "mixed_precision": ("no", "bf16", "fp16"), "data": ("colored_digits", "csv")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "eval_batch_size", "grad_accum", "rank", "log_every",
                    "keep_checkpoints", "repeats")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "save_every", "num_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if self.data == "csv" and not self.csv_path:
            raise ValueError("data='csv' needs csv_path (and image_root)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """A config from a YAML file (unknown keys are an error naming them), then ``overrides``."""
    values = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} not found")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{p}: expected a mapping of config keys, got {type(values).__name__}")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}{f' in {path}' if path else ''}")
    return TrainConfig(**values).validate()


def _parse_value(text: str, kind):
    """Flags take YAML values: ``--rank 16``, ``--targets '[qkv, proj]'``, ``--checkpoint null``."""
    value = yaml.safe_load(text)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads '1e-3' (no dot) as a string
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field, defaulting to 'not given' so YAML values survive."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        kind = kind if kind in (int, float, bool, str) else None
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                            type=lambda t, k=kind: _parse_value(t, k), metavar="VALUE")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if hasattr(args, f.name)}
    return load_config(getattr(args, "config", None), overrides)


def dump(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=str)

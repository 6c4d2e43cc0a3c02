"""Training configuration: one dataclass, the single source of every flag.

Each field carries its help text, choices, range and the section it belongs to in
``field(metadata=...)``; ``validate`` checks them all in one place, ``add_config_arguments``
turns them into documented ``--flags``, and a YAML file supplies many at once. This module
imports only ``yaml`` so that ``--help`` answers before torch is loaded.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Kept in step with fastfair.losses.PENALTIES and fastfair.backend.BACKENDS (a test checks):
# importing those modules would load torch, and --help must not wait for it.
PENALTIES = ("variance", "std", "range", "worst", "dro", "cvar", "none")
BACKENDS = ("auto", "torch", "triton")
METHODS = ("erm", "fairlora", "groupdro", "reweight", "jtt", "dfr")


@dataclass(frozen=True)
class Range:
    """An interval a number must lie in; ``open_lo``/``open_hi`` exclude that end."""

    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, v) -> bool:
        above = v > self.lo if self.open_lo else v >= self.lo
        below = v < self.hi if self.open_hi else v <= self.hi
        return above and below

    def __str__(self) -> str:
        def end(x):
            return "inf" if x == math.inf else ("-inf" if x == -math.inf else f"{x:g}")
        lo = "(" if self.open_lo or self.lo == -math.inf else "["  # infinities are never accepted
        hi = ")" if self.open_hi or self.hi == math.inf else "]"
        return f"{lo}{end(self.lo)}, {end(self.hi)}{hi}"


POSITIVE_INT, NON_NEGATIVE = Range(1), Range(0)
POSITIVE, UNIT = Range(0, open_lo=True), Range(0, 1)


def opt(default, help: str, *, choices=None, range: Range | None = None, section: str = "",
        applies: tuple[str, tuple] | None = None, resumable: bool = False, saved: bool = True):
    """A config field with its documentation.

    ``applies=(key, values)``: the flag means something only when ``key`` is one of ``values``;
    given otherwise it is refused by name. ``resumable``: may differ on ``--resume`` (it does not
    change what the run computes). ``saved=False``: an instruction to this invocation, not part of
    the run, so not written to ``config.yaml``.
    """
    meta = dict(help=help, choices=choices, range=range, section=section, applies=applies,
                resumable=resumable, saved=saved)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


LORA = ("finetune", ("lora",))
NOT_FULL = ("finetune", ("lora", "linear"))
CSV = ("data", ("csv",))
DIGITS = ("data", ("colored_digits",))


@dataclass
class TrainConfig:
    # The defaults are the embedded CPU demo: timm's tiny test ViT (6 blocks, width 64) at 32 px
    # with 16 px patches (4 tokens), which LoRA can fit from random init in a few hundred steps.
    model: str = opt("test_vit", "timm architecture name", section="model")
    pretrained: bool = opt(False, "load timm's published weights (needs internet)", section="model")
    checkpoint: str | None = opt(None, "local backbone weights (.safetensors/.pt/.pth); the head is "
                                 "re-initialized and position embeddings resampled", section="model")
    img_size: int | None = opt(32, "model input size; null keeps the model's own", range=Range(1),
                               section="model")
    patch_size: int | None = opt(16, "ViT patch size; null keeps the model's own", range=Range(1),
                                 section="model")
    depth: int | None = opt(None, "number of blocks; null keeps the model's own", range=Range(1),
                            section="model")
    model_kwargs: dict = opt({}, "extra keyword arguments for timm.create_model", section="model")
    attn: str = opt("sdpa", "attention kernel: PyTorch's scaled_dot_product_attention (which picks "
                    "flash or memory-efficient kernels itself) or timm's eager path",
                    choices=("sdpa", "eager"), section="model")
    finetune: str = opt("lora", "what is trained: LoRA adapters, every parameter, or the head alone",
                        choices=("lora", "full", "linear"), section="fine-tuning")
    targets: list | str | None = opt(None, "module-name patterns that get LoRA; null: the timm "
                              "family's attention and MLP projections (docs/families.md)",
                              section="fine-tuning", applies=LORA)
    exclude: list | str = opt([], "module-name patterns never given LoRA", section="fine-tuning",
                              applies=LORA)
    trainable: list | None = opt(None, "module-name patterns trained in full beside the adapters; "
                          "null: the classifier timm's metadata names",
                          section="fine-tuning", applies=NOT_FULL)
    rank: int = opt(8, "LoRA rank", range=POSITIVE_INT, section="fine-tuning", applies=LORA)
    adapter_name: str = opt("default", "name of the adapter in the saved PEFT files",
                            section="fine-tuning", applies=LORA)
    alpha: float = opt(16.0, "LoRA scale numerator (scale = alpha / rank)", range=POSITIVE,
                       section="fine-tuning", applies=LORA)
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", range=Range(0, 1, open_hi=True),
                              section="fine-tuning", applies=LORA)
    use_rslora: bool = opt(False, "rank-stabilized scale alpha / sqrt(rank)", section="fine-tuning",
                           applies=LORA)
    rank_pattern: dict = opt({}, "per-module rank overrides {pattern: rank}", section="fine-tuning",
                             applies=LORA)
    int8: bool = opt(False, "store the frozen backbone as bitsandbytes int8", section="fine-tuning",
                     applies=NOT_FULL)
    backend: str = opt("auto", "kernels: Triton on CUDA with auto, else the PyTorch reference",
                       choices=BACKENDS, section="fine-tuning")
    lam: float = opt(0.0, "weight of the fairness penalty (0: plain cross-entropy)", range=NON_NEGATIVE,
                     section="fairness loss")
    penalty: str = opt("variance", "penalty on the per-group mean losses", choices=PENALTIES,
                       section="fairness loss")
    loss_groups: str = opt("group", "what the penalty's groups are", choices=("group", "class", "attribute"),
                           section="fairness loss")
    penalty_alpha: float = opt(0.5, "CVaR: the fraction of worst groups averaged", range=Range(0, 1, open_lo=True),
                               section="fairness loss", applies=("penalty", ("cvar",)))
    dro_step_size: float = opt(0.01, "GroupDRO: step size of the online group weights", range=NON_NEGATIVE,
                               section="fairness loss")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", range=Range(0, 1, open_hi=True),
                                 section="fairness loss")
    epochs: int = opt(8, "passes over the training split", range=POSITIVE_INT, section="optimization")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (smoke runs)",
                                range=POSITIVE_INT, section="optimization")
    batch_size: int = opt(64, "training batch per process", range=POSITIVE_INT, section="optimization")
    eval_batch_size: int = opt(256, "evaluation batch per process", range=POSITIVE_INT,
                               section="optimization", resumable=True)
    grad_accum: int = opt(1, "batches per optimizer step", range=POSITIVE_INT, section="optimization")
    lr: float = opt(3e-3, "peak learning rate (AdamW)", range=POSITIVE, section="optimization")
    weight_decay: float = opt(0.0, "AdamW weight decay", range=NON_NEGATIVE, section="optimization")
    warmup_steps: int = opt(10, "linear warm-up steps before the cosine decay", range=NON_NEGATIVE,
                            section="optimization")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of lr", range=UNIT,
                              section="optimization")
    balanced_sampling: bool = opt(False, "draw training batches group-balanced", section="optimization")
    nan_policy: str = opt("stop", "on a non-finite loss or gradient: stop with an error naming the step "
                          "and the last good checkpoint, or skip that update (one host sync per step)",
                          choices=("stop", "skip"), section="optimization", resumable=True)
    method: str = opt("fairlora", "what the run does about groups (see fastfair.methods)", choices=METHODS,
                      section="method")
    jtt_epochs: int = opt(1, "JTT: epochs of the identification (ERM) run", range=POSITIVE_INT,
                          section="method")
    jtt_upweight: float = opt(5.0, "JTT: how many times each error of that run is repeated",
                              range=Range(1), section="method")
    dfr_c_grid: list = opt([1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01], "DFR: inverse L1 strengths the "
                           "held-out validation half chooses from (DFR's own grid)", section="method")
    dfr_subsets: int = opt(10, "DFR: group-balanced subsets each last-layer fit is averaged over",
                           range=POSITIVE_INT, section="method")
    select_by: str | None = opt("auto", "validation metric whose best epoch is kept and tested; auto: "
                                "worst_group_accuracy when there are groups; null: the last epoch",
                                section="method")
    mixed_precision: str = opt("no", "autocast precision", choices=("no", "bf16", "fp16"),
                               section="optimization")
    seed: int = opt(0, "seed of the model, the batches and (without data_seed) the data", range=NON_NEGATIVE,
                    section="run")
    data_seed: int | None = opt(None, "seed of the data split and colors; null: the same as seed", range=NON_NEGATIVE,
                                section="run")
    data: str = opt("colored_digits", "dataset: the embedded colored digits, or images listed in a CSV",
                    choices=("colored_digits", "csv"), section="data")
    correlation: float = opt(0.95, "colored digits: how often the color agrees with the label in training",
                             range=UNIT, section="data", applies=DIGITS)
    binary: bool = opt(True, "colored digits: digit < 5 vs the rest with two colors (4 groups)",
                       section="data", applies=DIGITS)
    repeats: int = opt(2, "colored digits: copies of each digit, each colored anew", range=POSITIVE_INT,
                       section="data", applies=DIGITS)
    csv_path: str | None = opt(None, "CSV listing the images (path, label, group, split)", section="data",
                               applies=CSV)
    image_root: str | None = opt(None, "directory the CSV paths are relative to", section="data", applies=CSV)
    path_col: str = opt("path", "CSV column of image paths", section="data", applies=CSV)
    label_col: str = opt("label", "CSV column of labels", section="data", applies=CSV)
    group_col: str = opt("group", "CSV column of groups", section="data", applies=CSV)
    split_col: str = opt("split", "CSV column of splits", section="data", applies=CSV)
    image_size: int | None = opt(None, "images are resized to this; null: img_size", range=Range(4),
                                 section="data")
    num_workers: int = opt(0, "data-loader worker processes", range=NON_NEGATIVE, section="data",
                           resumable=True)
    verify_images: str = opt("auto", "decode every image before training (auto: full under 100k images)",
                             choices=("auto", "full", "sample", "none"), section="data", applies=CSV,
                             resumable=True)
    allow_outside_root: bool = opt(False, "accept CSV paths that leave image_root", section="data",
                                   applies=CSV)
    output_dir: str = opt("runs/default", "run directory (must not hold another run)", section="output")
    save_every: int = opt(0, "optimizer steps between checkpoints (0: only at the end)", range=NON_NEGATIVE,
                          section="output", resumable=True)
    keep_checkpoints: int = opt(2, "checkpoints kept besides the selected epoch's", range=POSITIVE_INT,
                                section="output", resumable=True)
    log_every: int = opt(10, "optimizer steps between loss readings", range=POSITIVE_INT, section="output",
                         resumable=True)
    log_with: str | None = opt("tensorboard", "accelerate tracker, or null", section="output", resumable=True)
    report_ci: bool = opt(True, "bootstrap intervals in the final report", section="output", resumable=True)
    n_boot: int = opt(200, "bootstrap resamples", range=POSITIVE_INT, section="output", resumable=True)
    overwrite: bool = opt(False, "replace a run already in output_dir (its checkpoints, metrics, "
                          "predictions and report are removed first)", section="output", saved=False)
    resume_without_rng_state: bool = opt(False, "resume even when the checkpoint's random states are "
                                         "missing or corrupt (the run will not reproduce)",
                                         section="output", saved=False)

    def validate(self) -> "TrainConfig":
        """Types, choices and ranges of every field, then the checks across fields."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f, hints[f.name], getattr(self, f.name)))
        size = self.image_size or self.img_size
        if size is not None and self.patch_size is not None and size % self.patch_size:
            raise ValueError(f"image size {size} is not a multiple of patch_size={self.patch_size}")
        if self.data == "csv" and not self.csv_path:
            raise ValueError("data='csv' needs csv_path (and image_root)")
        # timm's hub weights have the architecture's own depth; a local checkpoint may have been
        # trained at this depth, and loading it checks that every tensor fits (models.py)
        if self.pretrained and self.depth is not None:
            raise ValueError(f"depth={self.depth} changes the architecture, so pretrained weights "
                             "cannot load; set depth to null")
        return self

    def check_applicable(self, given) -> "TrainConfig":
        """Refuse, by name, keys the user gave that mean nothing for this data or fine-tuning mode."""
        for f in dataclasses.fields(self):
            rule = f.metadata["applies"]
            if f.name in given and rule and getattr(self, rule[0]) not in rule[1]:
                raise ValueError(f"--{flag(f.name)} does not apply with {rule[0]}={getattr(self, rule[0])!r} "
                                 f"(only with {rule[0]} in {list(rule[1])}); remove it")
        return self

    def replace(self, **changes) -> "TrainConfig":
        """A derived config (``dataclasses.replace``), validated."""
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        """What defines the run: every key but the per-invocation instructions (``overwrite``,
        ``resume_without_rng_state``), as config.yaml holds it."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata["saved"]}

    def save(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def summary(self) -> str:
        """One line for the log; the whole config is in config.yaml."""
        what = f"LoRA r={self.rank}" if self.finetune == "lora" else self.finetune
        return (f"{self.model} {what}, {self.method} lam={self.lam:g} {self.penalty}, lr={self.lr:g}, "
                f"{self.epochs} epochs x bs {self.batch_size}, data={self.data}, seed={self.seed}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_value(f: dataclasses.Field, hint, value):
    """``value`` for field ``f``, numbers coerced (YAML 1.1 reads '1e-3' as a string), or a
    ValueError naming the field and the value."""
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] if typing.get_args(hint) else [hint]
    kinds = [typing.get_origin(k) or k for k in kinds]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if float in kinds and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{f.name} must be a number, got {value!r}") from None
    if not any(_is(value, k) for k in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{f.name} must be {names}, got {value!r}")
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{f.name} must be finite, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
    if meta["range"] is not None and value not in meta["range"]:
        raise ValueError(f"{f.name} must be in {meta['range']}, got {value!r}")
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config(path=None, overrides: dict | None = None, given=None) -> TrainConfig:
    """A config from a YAML file (unknown keys are an error naming them), then ``overrides``.

    ``given``: keys the user chose (flags, their own YAML file); those that do not apply to the
    chosen data or fine-tuning mode are refused. A run's own config.yaml is not "given".
    """
    values = read_yaml(path) if path is not None else {}
    values.update(overrides or {})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}{f' in {path}' if path else ''}")
    cfg = TrainConfig(**values).validate()
    return cfg.check_applicable(set(given or ()))


def read_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} not found")
    values = yaml.safe_load(p.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def _flag_type(f: dataclasses.Field, hint):
    """Flags take YAML values: ``--rank 16``, ``--targets '[qkv, proj]'``, ``--checkpoint null``."""
    def parse(text: str):
        try:
            return check_value(f, hint, yaml.safe_load(text))
        except (ValueError, yaml.YAMLError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = f.name  # argparse names the type in its error
    return parse


def _metavar(f: dataclasses.Field, hint) -> str:
    if f.metadata["choices"]:
        return "{" + ",".join(map(str, f.metadata["choices"])) + "}"
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return "|".join((typing.get_origin(a) or a).__name__.upper() for a in args)


def _help(f: dataclasses.Field) -> str:
    meta, parts = f.metadata, [f.metadata["help"]]
    if meta["choices"]:
        parts.append(f"choices: {', '.join(map(str, meta['choices']))}")
    if meta["range"] is not None:
        parts.append(f"range: {meta['range']}")
    if meta["applies"]:
        parts.append(f"only with {meta['applies'][0]}={'/'.join(meta['applies'][1])}")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    parts.append(f"default: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}")
    return "; ".join(parts).replace("%", "%%")


def add_config_arguments(parser: argparse.ArgumentParser, skip=()) -> None:
    """One documented ``--flag`` per config field (help, choices, range, default), grouped by
    section; a flag not given stays absent so the YAML value under it survives."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        section = f.metadata["section"]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (TrainConfig)")
        switch = dict(nargs="?", const=True) if hints[f.name] is bool else {}  # --overwrite alone: true
        groups[section].add_argument(f"--{flag(f.name)}", dest=f.name, default=argparse.SUPPRESS,
                                     type=_flag_type(f, hints[f.name]), help=_help(f),
                                     metavar=_metavar(f, hints[f.name]), **switch)


def given_keys(args: argparse.Namespace) -> set[str]:
    return {name for name in FIELDS if hasattr(args, name)}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of ``--config FILE`` (if any) with the flags over it; flags that do not apply
    to the chosen data or fine-tuning mode are refused."""
    overrides = {name: getattr(args, name) for name in given_keys(args)}
    path = getattr(args, "config", None)
    given = set(overrides) | (set(read_yaml(path)) if path else set())
    return load_config(path, overrides, given=given)


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

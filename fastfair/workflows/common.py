"""The base every workflow command stands on, so no workflow imports another.

One place runs a config (``run_config``), derives one (``derive``), builds a workflow's data
(``datasets_for``, the trainer's builder: the backbone's normalization and ``data_seed``),
builds a model (``build_model``), predicts, splits data (``Subset``, ``half_split``), pre-trains
and caches the tiny backbone (``pretrained_backbone``), summarizes seeds with the sample std and
calls a difference within the seed spread a tie. Heavy modules (torch, timm, the trainer) are
imported inside the functions that need them, so a workflow's ``--help`` parses at once.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import statistics
from pathlib import Path

from ..config import TrainConfig

# -- configs and runs ----------------------------------------------------------------------------


def derive(base: TrainConfig, **changes) -> TrainConfig:
    """``base`` with ``changes`` (config keys), validated; ``base`` is left as it was (the copy
    shares no list or dict with it)."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}")
    return dataclasses.replace(copy.deepcopy(base), **changes).validate()


def run_config(cfg: TrainConfig, **train_kwargs) -> dict:
    """Train ``cfg`` by its ``method``: the one place the workflows start a run. Same arguments
    and result as ``fastfair.trainer.train``, which ``fastfair.methods.run`` calls (looked up at
    call time, so a test can watch it); ``train`` alone would ignore ``method``."""
    from .. import methods

    return methods.run(cfg, **train_kwargs)


def datasets_for(cfg: TrainConfig, **changes) -> dict:
    """``{"train", "val", "test"}`` of ``derive(cfg, **changes)`` through the trainer's builder:
    normalized for the config's backbone, split and colored by ``data_seed`` (else ``seed``)."""
    from ..trainer import build_datasets_for

    return build_datasets_for(derive(cfg, **changes) if changes else cfg)


def build_model(cfg: TrainConfig, num_classes: int, weights=None):
    """A fresh backbone with a ``num_classes`` head, initialized from ``cfg.seed`` whatever ran
    before; ``weights`` (a weights file) replace the body and the head is drawn anew, since a
    source task's head means nothing for the target."""
    import torch

    from ..models import create_backbone, load_backbone_weights

    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg, num_classes)
    if weights is not None:
        load_backbone_weights(model, weights)
        model.reset_classifier(num_classes)
    return model


# -- data and prediction -------------------------------------------------------------------------


def _subset_class():
    import torch

    class Subset(torch.utils.data.Dataset):
        """Items ``indices`` of a fastfair dataset, with its per-item attributes sliced alike."""

        def __init__(self, base, indices):
            self.base, self.indices = base, torch.as_tensor(indices, dtype=torch.long)
            for name in ("num_classes", "num_groups", "group_names", "class_names", "mean", "std"):
                if hasattr(base, name):
                    setattr(self, name, getattr(base, name))
            for name in ("labels", "groups", "attributes", "digits"):
                if hasattr(base, name):
                    setattr(self, name, torch.as_tensor(getattr(base, name))[self.indices])

        def __len__(self):
            return len(self.indices)

        def __getitem__(self, i):
            return self.base[int(self.indices[i])]

    return Subset


def __getattr__(name):
    # Subset subclasses torch's Dataset: built on first use so importing this module stays light
    if name == "Subset":
        globals()["Subset"] = cls = _subset_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def half_split(ds, seed: int):
    """Item indices of two halves of ``ds`` that share no source image (``ds.source_index``)."""
    import torch

    src = torch.as_tensor(ds.source_index)
    uniq = torch.unique(src)
    perm = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    first = torch.isin(src, perm[: len(uniq) // 2])
    return first.nonzero().flatten(), (~first).nonzero().flatten()


def stack_images(ds):
    """All images and labels of ``ds`` as two tensors."""
    import torch
    from torch.utils.data import DataLoader

    images, labels = [], []
    for x, y, _ in DataLoader(ds, batch_size=512):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def predict(model, images, batch_size: int = 256):
    """Arg-max predictions of ``model`` on a tensor of images, in eval mode (mode restored)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        preds = [model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


# -- the pre-trained tiny backbone ---------------------------------------------------------------

# The documented pre-training (docs/reproducing.md): the whole tiny ViT on 10-class colored digits
# with uniform colors, so it learns shapes that LoRA can adapt; the architecture is the caller's.
PRETRAIN = dict(finetune="full", method="erm", lam=0.0, binary=False, correlation=0.1, repeats=2,
                epochs=6, max_steps=None, lr=1e-3, batch_size=64, seed=0, select_by=None, data="colored_digits",
                checkpoint=None, pretrained=False, log_with=None, report_ci=False, save_every=0)
ARCH_KEYS = ("model", "img_size", "patch_size", "depth", "model_kwargs", "attn")


def cache_dir() -> Path:
    """``$FASTFAIR_CACHE_DIR``, else ``fastfair`` under the user's cache directory."""
    if os.environ.get("FASTFAIR_CACHE_DIR"):
        return Path(os.environ["FASTFAIR_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fastfair"


def pretrain_config(cfg: TrainConfig, **changes) -> TrainConfig:
    """The pre-training run for ``cfg``'s architecture; its data seed is ``cfg.data_seed`` (0
    when unset), which the fine-tuning must then share so no test image was a pre-training one."""
    keep = {k: getattr(cfg, k) for k in ARCH_KEYS}
    return derive(TrainConfig(), **{**PRETRAIN, **keep, "data_seed": pretrain_data_seed(cfg), **changes})


def pretrain_data_seed(cfg: TrainConfig) -> int:
    return 0 if cfg.data_seed is None else cfg.data_seed


def pretrained_backbone(cfg: TrainConfig, **changes) -> Path:
    """The weights file of the tiny backbone pre-trained as the docs do, for ``cfg``'s architecture.

    Trained on first use and cached under ``cache_dir()/pretrain/<key>``, ``key`` a hash of the
    pre-training config (``changes`` override it, e.g. ``max_steps`` in tests), so any change
    trains anew and the same config is reused. A killed pre-training leaves no half entry: it
    trains in ``<key>.partial`` and is renamed when done.
    """
    from accelerate import PartialState

    pcfg = pretrain_config(cfg, **changes)
    values = {k: v for k, v in pcfg.to_dict().items() if k != "output_dir"}
    key = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
    final = cache_dir() / "pretrain" / key
    weights = final / "model" / "model.safetensors"
    if weights.is_file():
        return weights
    state = PartialState()
    partial = final.with_name(key + ".partial")
    if state.is_main_process and partial.exists():
        import shutil

        shutil.rmtree(partial)  # a killed pre-training: start it over
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"fastfair: pre-training the {pcfg.model} backbone once ({pcfg.epochs} epochs), "
              f"cached in {final}", flush=True)
    run_config(derive(pcfg, output_dir=str(partial)))
    if state.is_main_process:
        os.replace(partial, final)
    state.wait_for_everyone()
    return weights


def with_backbone(cfg: TrainConfig, backbone: str | None, **pretrain_changes) -> TrainConfig:
    """``cfg`` for ``--backbone``: ``None``/``"config"`` keep it; ``"pretrain"`` loads the cached
    pre-trained tiny backbone (training it first if needed) and fixes the data seed to the
    pre-training's, so seeds vary initialization and order but never leak pre-training images."""
    if backbone in (None, "config"):
        return cfg
    if backbone != "pretrain":
        raise ValueError(f"--backbone must be 'config' or 'pretrain', got {backbone!r}")
    if cfg.pretrained or cfg.checkpoint:
        raise ValueError("--backbone pretrain replaces the backbone weights: drop --pretrained/--checkpoint")
    weights = pretrained_backbone(cfg, **pretrain_changes)
    return derive(cfg, checkpoint=str(weights), data_seed=pretrain_data_seed(cfg))


# The fine-tuning set-up of docs/reproducing.md ($COMMON): what --backbone pretrain fills in for
# every key the user gave neither as a flag nor in --config.
DOCS_SETUP = dict(model="test_vit", depth=None, img_size=16, patch_size=8, binary=True, repeats=2, epochs=2,
                  batch_size=64, lr=2e-3, log_with=None, report_ci=False)


def add_backbone_argument(parser) -> None:
    parser.add_argument("--backbone", choices=("config", "pretrain"), default="config",
                        help="'pretrain': the set-up of docs/reproducing.md: pre-train the tiny backbone "
                             "(cached under $FASTFAIR_CACHE_DIR or ~/.cache/fastfair, reused), start from "
                             "it with the data seed fixed to the pre-training's (0 unless --data-seed), and "
                             "take the docs' fine-tuning settings ($COMMON: "
                             + ", ".join(f"{k}={v}" for k, v in DOCS_SETUP.items())
                             + ") for every key not given as a flag or in --config; "
                             "'config': the config as given (default: %(default)s)")


def workflow_parser(name: str, doc: str, example: str, config_help: str):
    """A workflow's parser (its docstring as description, an example as epilog) and the argument
    group for its own flags, which starts with ``--config``; finish with ``add_shared_arguments``."""
    parser = argparse.ArgumentParser(prog=f"fastfair {name}", description=doc, epilog=f"Example: {example}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group(name)
    group.add_argument("--config", help=config_help)
    return parser, group


def add_shared_arguments(parser, group) -> None:
    """``--backbone`` in the workflow's group, then one flag per train config key."""
    from ..config import add_config_arguments

    add_backbone_argument(group)
    add_config_arguments(parser)


def workflow_config(args) -> TrainConfig:
    """The config of a workflow's parsed arguments (``--config``, flags, ``--backbone``)."""
    import yaml

    from ..config import config_from_args

    cfg = config_from_args(args)
    if args.backbone != "pretrain":
        return cfg
    given = {f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if getattr(args, "config", None):
        given |= set(yaml.safe_load(Path(args.config).read_text()) or {})
    return with_backbone(derive(cfg, **{k: v for k, v in DOCS_SETUP.items() if k not in given}), "pretrain")


# -- progress headers ----------------------------------------------------------------------------


class Phases:
    """Numbered phase headers of a workflow on the main process: ``[debias 2/5] upstream adapter, seed 1``."""

    def __init__(self, workflow: str, total: int):
        self.workflow, self.total, self.done = workflow, total, 0

    def __call__(self, text: str) -> None:
        from accelerate import PartialState

        self.done += 1
        if PartialState().is_main_process:
            print(f"[{self.workflow} {self.done}/{self.total}] {text}", flush=True)


# -- runs that resume ---------------------------------------------------------------

def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d))


def run_point(cfg: TrainConfig, datasets=None, stale: str = "error") -> dict:
    """Train one run unless its ``result.json`` exists; returns that result
    (``{"config", "output_dir", "val", "test"}``, scalar metrics).

    A run dir holding another config (finished, or a checkpoint to resume) is an error with
    ``stale='error'`` (a study whose base config changed) and is deleted with ``'replace'``.
    """
    import shutil

    import yaml
    from accelerate import PartialState

    from ..metrics import scalar_metrics
    from ..trainer import latest_checkpoint

    state = PartialState()
    out = Path(cfg.output_dir)
    want = _plain(cfg.to_dict())
    result_path, config_path = out / "result.json", out / "config.yaml"
    held = None
    if result_path.is_file():
        held = json.loads(result_path.read_text())["config"]
    elif config_path.is_file():
        held = _plain(yaml.safe_load(config_path.read_text()) or {})
    if held is not None and held != want:
        if stale != "replace":
            diff = sorted(k for k in want if held.get(k) != want[k])
            raise ValueError(f"{out} holds a run with another config (keys {diff}); "
                             "run into a new directory")
        held = None
    if held is not None and result_path.is_file():
        return json.loads(result_path.read_text())
    resume = str(out) if held is not None and latest_checkpoint(out) is not None else None
    if resume is None and out.exists():
        # killed before its first checkpoint, or stale: nothing to keep (metrics.jsonl appends)
        if state.is_main_process:
            shutil.rmtree(out)
        state.wait_for_everyone()
    res = run_config(cfg, resume=resume, datasets=datasets)
    result = {"config": want, "output_dir": str(out),
              "val": scalar_metrics(res["val"]), "test": scalar_metrics(res["test"])}
    if state.is_main_process:
        write_json_atomic(result_path, result)
    state.wait_for_everyone()
    return result


# -- flags, tables, seeds ------------------------------------------------------------------------


def comma_list(kind):
    """An argparse type for ``--flag 1,4,16``."""
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from e
    return parse


def fmt_mean_std(mean, std, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def print_results(command: str, out_dir) -> int:
    """A workflow's closing words: its results table and where the files are."""
    print((Path(out_dir) / "results.md").read_text())
    print(f"fastfair {command}: table and plot in {out_dir}")
    return 0


def write_rows(out_dir: Path, rows: list[dict], payload: dict) -> None:
    """``results.csv`` (one row per run) and ``results.json`` (``payload`` plus the rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and *sample* standard deviation (``None`` with fewer than two values), NaN/None left out."""
    v = _finite(values)
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def summarize_seeds(rows: list[dict], keys: tuple[str, ...], metrics) -> list[dict]:
    """One row per distinct ``keys`` tuple (first-seen order): each metric's mean over seeds and
    its sample standard deviation (``None`` with one seed); missing or NaN values are left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, sel in groups.items():
        s = {**dict(zip(keys, key)), "n_seeds": len(sel)}
        for m in metrics:
            s[m], s[m + "_std"] = mean_std(r.get(m) for r in sel)
        out.append(s)
    return out


TIE_RULE = "a difference smaller than the seed spread (sample std over seeds) is called a tie"


def verdict(diff: float | None, spread: float | None, higher_is_better: bool = True) -> str:
    """``"better"``, ``"worse"`` or ``"tie"`` for a mean difference against its seed spread;
    ``"one seed"`` when the spread is unknown, so no difference is established."""
    if diff is None:
        return "n/a"
    if spread is None:
        return "one seed"
    if abs(diff) <= spread:
        return "tie"
    return "better" if (diff > 0) == higher_is_better else "worse"


def paired_change(rows: list[dict], arm_key: str, reference: str, match: tuple[str, ...], metric: str,
                  higher_is_better: bool = True) -> dict[tuple, dict]:
    """Each arm's change of ``metric`` against the ``reference`` arm, paired by seed and ``match``.

    Keyed by ``(*match values, arm)``: ``{"per_seed": {seed: change}, "mean", "std", "verdict"}``,
    ``std`` the sample std of the paired changes and ``verdict`` by :func:`verdict` (a change
    within that spread is a tie). Rows lacking their reference or the metric are left out.
    """
    ref = {(*(r[k] for k in match), r["seed"]): r.get(metric) for r in rows if r[arm_key] == reference}
    per: dict[tuple, dict] = {}
    for r in rows:
        if r[arm_key] == reference:
            continue
        base = ref.get((*(r[k] for k in match), r["seed"]))
        if base is None or r.get(metric) is None:
            continue
        per.setdefault((*(r[k] for k in match), r[arm_key]), {})[r["seed"]] = r[metric] - base
    out = {}
    for key, changes in per.items():
        mean, std = mean_std(changes.values())
        out[key] = {"per_seed": changes, "mean": mean, "std": std,
                    "verdict": verdict(mean, std, higher_is_better)}
    return out


def fmt_change(change: dict | None) -> str:
    """``+0.120 ± 0.030 (better)``; ``-`` without a paired reference."""
    if not change or change["mean"] is None:
        return "-"
    spread = f" ± {change['std']:.3f}" if change["std"] is not None else ""
    return f"{change['mean']:+.3f}{spread} ({change['verdict']})"


def seed_bars(summary: list[dict], category, series, metric: str, title: str = "", hatches=None):
    """A ``report.Bars`` panel of ``metric`` from seed summaries (:func:`summarize_seeds` rows):
    ``category(s)`` and ``series(s)`` name each row's bar; whiskers are the sample std."""
    from ..report import Bars

    cats = list(dict.fromkeys(category(s) for s in summary))
    names = list(dict.fromkeys(series(s) for s in summary))
    cell = {(category(s), series(s)): s for s in summary}

    def column(field, default=None):
        return {n: [cell.get((c, n), {}).get(field, default) for c in cats] for n in names}

    return Bars(categories=cats, values=column(metric), metric=metric, title=title,
                errors=column(metric + "_std"), n_seeds=column("n_seeds", 0), error_label="± sample std",
                hatches=hatches)

"""``fastfair train`` (and ``accelerate launch train.py``): parse the flags, then train.

Parsing needs only the config, so ``--help`` and bad flags answer before torch is imported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import FIELDS, TrainConfig, add_config_arguments, config_from_args, load_config

DESCRIPTION = """Fine-tune a timm model with LoRA (or fully, or the head alone) and a fairness loss.

Every TrainConfig key is a flag taking a YAML value (--targets '[qkv, fc1]', --checkpoint null);
--config FILE supplies many, flags override it. A run directory belongs to one run: continue it
with --resume RUN_DIR, replace it with --overwrite."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastfair train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest intact checkpoint, with its config; "
                        "only flags that do not change the run are accepted")
    add_config_arguments(p)
    return p


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The run's own config with the (resumable) flags over it; the trainer refuses the rest."""
    if args.config:
        raise ValueError("--config and --resume do not mix: a resumed run keeps its own config.yaml")
    if hasattr(args, "output_dir"):
        raise ValueError(f"--output-dir and --resume do not mix: the run continues in {args.resume}")
    path = Path(args.resume) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--resume {args.resume}: {path} not found (not a run directory)")
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return load_config(path, {**overrides, "output_dir": str(args.resume)})


def side_by_side(runs: dict[str, dict], split: str = "test") -> str:
    """A markdown table: one column per run, one row per summary metric."""
    from .metrics import summary_keys

    names = list(runs)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in summary_keys():
        cells = ["n/a" if runs[n][split].get(key) is None else f"{runs[n][split][key]:.4f}" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 training diverged (non-finite), 2 bad flags, config or run directory."""
    args = build_parser().parse_args(argv)
    from .methods import run
    from .trainer import NonFiniteTraining

    try:
        cfg = resume_config(args) if args.resume else config_from_args(args)
        res = run(cfg, resume=args.resume)  # by cfg.method; the trainer alone would ignore it
    except NonFiniteTraining as e:
        print(f"fastfair train: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"fastfair train: error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(side_by_side({cfg.output_dir: res}))
    return 0

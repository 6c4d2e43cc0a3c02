"""The ``fastfair`` command: ``fastfair <command> [args]``.

Each command lives in its own module as ``main(argv) -> int``; it is imported only when run, and
parses its flags before importing torch, so ``--help`` answers at once.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "train": ("fastfair.train_cli", "fine-tune a timm model with LoRA and a fairness loss"),
    "report": ("fastfair.report", "write the fairness report of a run directory"),
    "sweep": ("fastfair.workflows.sweep", "FairLoRA rank x lambda sweep"),
    "tune": ("fastfair.workflows.tune", "FairTune: search what to fine-tune by validation fairness"),
    "debias": ("fastfair.workflows.debias", "PEFTDebias: upstream debiasing adapter, then the task"),
    "bias-transfer": ("fastfair.workflows.bias_transfer", "measure bias transfer (Salman et al.)"),
    "main-job": ("fastfair.workflows.main_job", "ERM vs FairLoRA, GroupDRO and DFR over 3 seeds (the "
                 "README's main job)"),
}
# The source checkout's root: it holds kernels/ (installed as fastfair.kernels), which must not
# stand in for the unrelated top-level `kernels` package that bitsandbytes imports.
_CHECKOUT = Path(__file__).resolve().parent.parent


def unshadow() -> None:
    """Drop the checkout's root from ``sys.path`` (``python train.py`` and ``python -m`` put it
    first); fastfair itself is already imported, so nothing of ours goes missing."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
    mod = sys.modules.get("kernels")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve().parent == _CHECKOUT / "kernels":
        del sys.modules["kernels"]


def _usage() -> str:
    from . import __version__

    lines = [f"usage: fastfair <command> [options]   (fastfair {__version__})", "",
             "commands (each takes --help):"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def run_command(name: str, argv: list[str]) -> int:
    unshadow()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"fastfair {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"fastfair: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())

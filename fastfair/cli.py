"""The ``fastfair`` command: ``fastfair <command> [args]``.

Each command lives in its own module as ``main(argv) -> int``; they are imported only when run,
so ``fastfair report`` does not pay for importing the trainer.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("fastfair.trainer", "fine-tune a timm model with LoRA and a fairness loss"),
    "report": ("fastfair.report", "write the fairness report of a run directory"),
    "sweep": ("fastfair.workflows.sweep", "FairLoRA rank x lambda sweep"),
    "tune": ("fastfair.workflows.tune", "FairTune: search what to fine-tune by validation fairness"),
    "debias": ("fastfair.workflows.debias", "PEFTDebias: upstream debiasing adapter, then the task"),
    "bias-transfer": ("fastfair.workflows.bias_transfer", "measure bias transfer (Salman et al.)"),
}


def _usage() -> str:
    lines = ["usage: fastfair <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastfair: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Entry point for ``accelerate launch train.py [flags]`` (or ``python train.py``).

With flags it is ``fastfair train``. With none it runs the main job (``fastfair main-job``): a tiny
ViT pre-trained once (cached), then ERM, FairLoRA, GroupDRO and DFR with LoRA on the embedded
colored-digits benchmark over 3 seeds, reported side by side with their spread; no download.
"""
import sys

from fastfair.cli import run_command

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(run_command("train", args) if args else run_command("main-job", []))

"""Entry point for ``accelerate launch train.py [flags]`` (or ``python train.py``).

With no arguments it runs the demo: a tiny ViT with LoRA on the embedded colored-digits
benchmark, once with lam = 0 and once with FairLoRA's lam, reports side by side.
"""
import sys

from fastfair.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:] or ["--demo"]))

"""Entry point for ``accelerate launch train.py [flags]``.

With no arguments it runs the demo: a tiny ViT with LoRA on the embedded colored-digits
benchmark, once with lam = 0 and once with FairLoRA's lam, reports side by side.
"""
import sys

from fastfair.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["--demo"]))

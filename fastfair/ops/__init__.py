"""Autograd functions and their plain-PyTorch references (the CPU path)."""

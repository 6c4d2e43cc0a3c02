"""Triton kernels of fastfair, installed as ``fastfair.kernels``.

Only Triton code lives here: no nn.Module, no autograd, no training logic. The PyTorch face
(autograd functions, the reference path that is also the CPU path) is in ``fastfair.ops``.
"""

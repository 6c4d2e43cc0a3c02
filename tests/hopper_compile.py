"""Compile kernels for sm_90 with no GPU: the interpreter accepts code the compiler rejects."""
import os
import subprocess
import sys

import pytest

HEADER = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"  # real @triton.jit functions, compiled, not interpreted
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, types, consts, **opts):
    sig = {n: types.get(n, "i32") for n in fn.arg_names}
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
"""


def assert_compiles_for_hopper(body: str) -> None:
    """Run ``HEADER + body`` (which calls ``build`` and prints 'compiled') in a fresh process."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", HEADER + body], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]

"""The layering docs/design.md promises, read from the source: a lower layer never imports a
higher one, so each can be used (and reviewed) alone."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved in ``package``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def test_kernels_import_nothing_from_fastfair():
    for path in (ROOT / "kernels").glob("*.py"):
        bad = {m for m in imported_modules(path, "fastfair.kernels")
               if m.startswith("fastfair") and not m.startswith("fastfair.kernels")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


# What an op may stand on: its kernels and the few low-level helpers beside it.
OPS_MAY_IMPORT = ("fastfair.ops", "fastfair.kernels", "fastfair.backend", "fastfair.int8", "fastfair.distributed")


@pytest.mark.parametrize("path", sorted((ROOT / "fastfair" / "ops").glob("*.py")), ids=lambda p: p.name)
def test_ops_import_only_kernels_and_low_level_helpers(path):
    bad = {m for m in imported_modules(path, "fastfair.ops")
           if m.startswith("fastfair") and not m.startswith(OPS_MAY_IMPORT)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_checks_see_a_violation(tmp_path):
    bad = tmp_path / "k.py"
    bad.write_text("from ..backend import triton_interpreting\nimport fastfair.trainer\n")
    assert imported_modules(bad, "fastfair.kernels") == {"fastfair.backend", "fastfair.trainer"}

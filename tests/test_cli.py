"""The command line: documented flags, answers before torch loads, and no misleading output."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fastfair import __version__
from fastfair.cli import main
from fastfair.config import FIELDS, flag

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_version_and_usage(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastfair {__version__}"
    assert main([]) == 0
    assert "bias-transfer" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_train_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also after hyphens
    for name, f in FIELDS.items():
        assert f"--{flag(name)}" in text and "".join(f.metadata["help"].split()) in text, name
    assert "--resumeRUN_DIR" in text and "choices:lora,full,linear" in text


def test_help_answers_before_torch_is_imported():
    # what makes --help fast (measured in the report): argparse runs before any heavy import
    proc = run_python("import sys\nfrom fastfair.cli import main\ntry:\n    main(['train', '--help'])\n"
                      "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'timm', 'accelerate') "
                      "if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_checkout_does_not_shadow_an_installed_kernels_package():
    # run from the repository root, as `python train.py` is: kernels/ is on sys.path until unshadow()
    proc = run_python("import importlib.util\nfrom fastfair.cli import unshadow\n"
                      "def origin():\n    spec = importlib.util.find_spec('kernels')\n"
                      "    return spec.origin if spec else 'none'\n"
                      "before = origin()\nunshadow()\nprint(before, origin())")
    assert proc.returncode == 0, proc.stderr
    before, after = proc.stdout.split()
    assert before == str(ROOT / "kernels" / "__init__.py") and not after.startswith(str(ROOT))


def test_only_the_known_bitsandbytes_line_is_dropped(caplog):
    import fastfair  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
        log.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    proc = run_python("import fastfair.quant")
    assert "gemm_4bit_forward" not in proc.stderr


def test_bad_flags_exit_2_with_the_reason(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse refuses it while parsing
        main(["train", "--lr", "0", "--output-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "argument --lr: lr must be in (0, inf), got 0.0" in capsys.readouterr().err
    assert main(["train", "--finetune", "linear", "--rank", "4", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--rank does not apply with finetune='linear'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

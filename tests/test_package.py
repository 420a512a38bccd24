"""Package-level promises: cheap import, no GPU/vendor runtimes pulled in, CLI exit codes."""

import subprocess
import sys

import pytest

from deployq.cli import main


def test_import_deployq_does_not_import_vendor_runtimes():
    code = (
        "import sys, deployq, deployq.backends, deployq.cli\n"
        "bad = [m for m in ('onnxruntime_qnn', 'tensorrt', 'pycuda', 'cuda') if m in sys.modules]\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import deployq pulled in {out.stdout.strip()}"


def test_backends_and_profiles_install_inside_the_package(tmp_path):
    # Run outside the repo so only what pip installed is importable.
    code = (
        "import importlib.util as u\n"
        "assert u.find_spec('deployq.backends') is not None\n"
        "assert u.find_spec('backends') is None and u.find_spec('profiles') is None\n"
        "from importlib.resources import files\n"
        "assert (files('deployq.profiles') / 'cpu.toml').is_file()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


@pytest.mark.parametrize(
    "argv",
    [["no-such-command"], ["check", "model.onnx"]],  # unknown command; missing required option
)
def test_usage_errors_exit_2_without_traceback(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "profiles" in capsys.readouterr().out

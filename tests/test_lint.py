"""The code stays ruff-clean, ruff-formatted and mypy-clean: `pytest` (and so
CI's .ci/run) runs all three with the rest, with the settings in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def test_ruff_check_is_clean():
    out = subprocess.run(
        [tool("ruff"), "check", "--output-format", "concise", str(REPO)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_clean():
    out = subprocess.run([tool("ruff"), "format", "--check", str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    out = subprocess.run([tool("mypy")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr

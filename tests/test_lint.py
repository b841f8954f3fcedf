"""The code stays ruff-clean: CI runs this with the rest."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    out = subprocess.run(
        [ruff, "check", "--output-format", "concise", str(REPO)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr

"""ruff over the whole tree, with the rules in pyproject.toml: unused or undefined names fail CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    try:
        import ruff  # noqa: F401  (installed by scripts/install.sh with the test tools)
    except ImportError:
        if shutil.which("ruff") is None:
            pytest.fail("ruff is not installed: run scripts/install.sh (it installs the test tools)")
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-1000:]

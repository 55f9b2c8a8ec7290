"""The project's wheel, built once per test session, for the tests of what a real install gets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What pyproject.toml packages: the build sees these and nothing else of the checkout, so a
# build cannot pass on a file the wheel does not carry (and writes nothing into the checkout).
PACKAGED = ("pyproject.toml", "README.md", "edgepaged", "kernels", "profiles")


def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the packaged files."""
    out = tmp_path_factory.getbasetemp() / "edgepaged-wheel"
    wheels = sorted(out.glob("edgepaged-*.whl"))
    if wheels:
        return wheels[0]
    src = out / "src"
    src.mkdir(parents=True)
    for name in PACKAGED:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("edgepaged-*.whl")
    return wheel


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would put the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env

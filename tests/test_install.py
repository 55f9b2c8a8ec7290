"""A real install: the wheel carries every shipped profile, the kernels and the CLI, and a venv
with nothing but that wheel (and the system's torch) lists and shows profiles and generates."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from wheel_build import REPO, built_wheel, clean_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return built_wheel(tmp_path_factory)


def test_wheel_carries_profiles_kernels_and_the_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {p.name for p in (REPO / "profiles").glob("*.yaml")}
    assert profiles and {f"edgepaged/profiles_data/{p}" for p in profiles} <= names
    kernels = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert {f"edgepaged/kernels/{k}" for k in kernels} <= names
    assert "edgepaged/__main__.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "edgepaged = edgepaged.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_runs_without_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The system's torch and friends are reused (as on a Jetson); only edgepaged comes from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = clean_env()

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(venv / "bin" / "edgepaged"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import edgepaged.profiles as p; print(p.__file__); print(p.PROFILES_DIR)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()
    assert all(Path(w).is_relative_to(venv) for w in where), where

    listed = {line.split()[0] for line in run("profile", "list").stdout.splitlines()}
    assert listed == {p.stem for p in (REPO / "profiles").glob("*.yaml")}
    plan = json.loads(run("profile", "show", "jetson-orin-nano-8gb", "--json").stdout)
    assert plan["profile"] == "jetson-orin-nano-8gb" and plan["num_blocks"] > 0
    answer = run("generate", "What is the capital of France? Answer in one sentence.", "--max-tokens", "12")
    assert "Paris" in answer.stdout

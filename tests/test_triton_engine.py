"""The whole engine on the triton backend gives the torch backend's greedy tokens (fp32).

The workload is built to cross every path the runner feeds the kernels: prompts sharing a
prefix (prefix-cache hits), a token budget small enough that prefill chunks share steps with
decodes, tables growing across block boundaries, and a pool small enough to preempt and
recompute. On the CPU the kernels run under TRITON_INTERPRET=1 in a child process (Triton picks
the interpreter when the kernels are imported, for the whole process: see test_kernels.py); this
file, run as a script, is that child. On a GPU the same comparison runs compiled, in-process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_CHILD_TIMEOUT_S = 240
NEW_TOKENS = 10


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(512) for _ in range(40)]
    alone = [[rng.randrange(512) for _ in range(n)] for n in (3, 17, 33)]
    return alone + [shared + [rng.randrange(512) for _ in range(n)] for n in (1, 9, 30)]


def generate(folder: Path, backend: str, device: str) -> dict:
    """Greedy tokens of every prompt, submitted together, the logits of every step, and the
    counters that prove the workload took the paths it is meant to."""
    from conftest import make_engine

    from edgepaged import SamplingParams

    engine = make_engine(
        folder, device=torch.device(device), backend=backend, num_kv_blocks=10, max_num_batched_tokens=24
    )
    mixed_steps, logits = 0, []
    execute = engine.runner.execute

    def recording_execute(out, kv, feed=None, **options):
        nonlocal mixed_steps
        mixed_steps += {c.num_tokens == 1 for c in out.chunks} == {True, False}
        result = execute(out, kv, feed, **options)
        if result.logits is not None:
            logits.append(result.logits.float().cpu())
        return result

    engine.runner.execute = recording_execute
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = _prompts()
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    stats = engine.stats()
    return {
        "tokens": [final[str(i)].outputs[0].token_ids for i in range(len(prompts))],
        "logits": torch.cat(logits),
        "mixed_steps": mixed_steps,
        "prefix_hit_tokens": stats.prefix_hit_tokens,
        "preemptions": stats.num_preemptions,
    }


def compare(folder: Path, device: str) -> dict:
    """Both backends on one device; the triton run's counters, whether the tokens agree, and the
    largest relative difference of any step's logits (the steps line up while tokens agree)."""
    got, want = generate(folder, "triton", device), generate(folder, "torch", device)
    same_tokens = got["tokens"] == want["tokens"]
    rel_err = float((got["logits"] - want["logits"]).norm(dim=-1).div(want["logits"].norm(dim=-1)).max()) if same_tokens else None
    counters = {k: got[k] for k in ("mixed_steps", "prefix_hit_tokens", "preemptions")}
    return {**counters, "tokens": got["tokens"], "same_tokens": same_tokens, "logits_rel_err": rel_err}


def _check(result: dict) -> None:
    assert result["mixed_steps"] > 0, "no step mixed prefill chunks with decodes"
    assert result["prefix_hit_tokens"] >= 32, "the prompts sharing 40 tokens should reuse 2 full blocks"
    assert result["preemptions"] > 0, "the 10-block pool should force a preemption"
    assert all(len(t) == NEW_TOKENS for t in result["tokens"])
    assert result["same_tokens"], "triton and torch backends chose different tokens"
    assert result["logits_rel_err"] < 1e-4, f"logits differ by {result['logits_rel_err']:.2e} (relative)"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from edgepaged.models.random_init import write_random_model

    return write_random_model(tmp_path_factory.mktemp("triton-engine"), "tiny-llama", vocab_size=512)


def test_triton_engine_matches_torch_engine_interpreted(model_dir):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, __file__, str(model_dir)],
        capture_output=True, text=True, env=env, timeout=_CHILD_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_engine_matches_torch_engine_on_gpu(model_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check(compare(model_dir, "cuda"))


if __name__ == "__main__":
    from test_kernels import _patch_interpreter_for_numpy_2_4

    _patch_interpreter_for_numpy_2_4()
    print(json.dumps(compare(Path(sys.argv[1]), "cpu")))

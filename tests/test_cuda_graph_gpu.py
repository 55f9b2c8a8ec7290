"""Decode steps replayed from CUDA graphs behave exactly like eager steps (GPU only).

Engines come from a small profile extending h100-80gb (the path `LLMEngine.from_model` takes in
production: profile run, memory plan, pool, capture). The batches are smaller than the graph
sizes that run them (3 rows in the 4-row graph, 5 in the 8-row one), so the padded rows are
exercised, and one prompt is long enough for the split-K decode path inside the graph. A short
chunk after a cached prefix runs in the graph too, one row per token.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    from edgepaged import SamplingParams
    from edgepaged.cuda_graph import GRAPHS_ENV, graph_batch_sizes
    from edgepaged.model_runner import GRAPH_MAX_CHUNK
    from edgepaged.engine import LLMEngine
    from edgepaged.kernels.reference import TOLERANCE
    from edgepaged.models.random_init import write_random_model

NEW_TOKENS = 24
PROFILE = """\
extends: h100-80gb
name: graph-test
model:
  dtype: {dtype}
scheduler:
  max_model_len: 2048
  max_num_seqs: 8
  max_num_batched_tokens: 512
  max_waiting_requests: 64
  max_waiting_tokens: 65536
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(
        tmp_path_factory.mktemp("graph-llama"), "tiny-llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
        num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
    )


def _engine(model_dir, tmp_path, dtype: str, graphs: bool, monkeypatch) -> LLMEngine:
    profile = tmp_path / f"graphs-{dtype}.yaml"
    profile.write_text(PROFILE.format(dtype=dtype))
    monkeypatch.setenv(GRAPHS_ENV, "1" if graphs else "0")
    return LLMEngine.from_model(model_dir, profile=profile, max_kv_blocks=600, backend="triton")


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(n)
    lengths = [1500, 7, 16, 33, 250][:n]
    return [[rng.randrange(1024) for _ in range(k)] for k in lengths]


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    return [final[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("num_prompts", [3, 5], ids=["3-rows-in-graph-4", "5-rows-in-graph-8"])
def test_graphs_on_and_off_give_the_same_greedy_tokens(model_dir, tmp_path, monkeypatch, num_prompts):
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = _prompts(num_prompts)
    eager = _engine(model_dir, tmp_path, "float32", graphs=False, monkeypatch=monkeypatch)
    assert eager.runner.graphs is None, f"{GRAPHS_ENV}=0 must turn graphs off"
    expected = _generate(eager, prompts)
    del eager

    engine = _engine(model_dir, tmp_path, "float32", graphs=True, monkeypatch=monkeypatch)
    graphs = engine.runner.graphs
    # max_num_seqs 8, widened to hold one GRAPH_MAX_CHUNK-token chunk of a cached prefix's tail.
    assert graphs is not None and graphs.sizes == graph_batch_sizes(max(8, GRAPH_MAX_CHUNK)) == [1, 2, 4, 8, 16]
    assert graphs.memory_bytes > 0
    got = _generate(engine, prompts)
    assert got == expected
    # Every step after the prompts are in is decode-only; the long prompt takes a few mixed steps.
    assert graphs.replays >= NEW_TOKENS - 4, f"only {graphs.replays} steps replayed a graph"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_step_matches_eager_step(model_dir, tmp_path, monkeypatch, dtype):
    """The same decode step through the graph and eagerly: same logits within the dtype's
    tolerance (the graph pads 5 rows to 8 and plans attention for the model's 2,048 positions,
    eager for the batch's 1.5k)."""
    engine = _engine(model_dir, tmp_path, dtype, graphs=True, monkeypatch=monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(_prompts(5)):
        engine.add_request(str(i), ids, params)
    while len(engine.scheduler.running) < 5 or any(
        s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running
    ):
        engine.step()
    sched = engine.scheduler.schedule()
    assert len(sched.chunks) == 5 and all(c.num_tokens == 1 for c in sched.chunks)
    runner = engine.runner
    replays = runner.graphs.replays
    graph_logits = runner.execute(sched, engine.kv).logits.float().clone()
    assert runner.graphs.replays == replays + 1
    saved, runner.graphs = runner.graphs, None
    eager_logits = runner.execute(sched, engine.kv).logits.float()
    runner.graphs = saved
    assert graph_logits.isfinite().all()
    err = ((graph_logits - eager_logits).norm() / eager_logits.norm()).item()
    assert err < TOLERANCE[getattr(torch, dtype)], f"graph vs eager logits: relative error {err:.2e}"


def test_a_short_tail_after_a_cached_prefix_runs_in_the_graph(model_dir, tmp_path, monkeypatch):
    """The second prompt finds 512 tokens cached and computes its 9-token tail as 9 graph rows;
    every one of its steps replays a graph, and its tokens match the eager engine's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(9)
    prefix = [rng.randrange(1024) for _ in range(512)]
    first, second = prefix + [rng.randrange(1024) for _ in range(5)], prefix + [rng.randrange(1024) for _ in range(9)]
    tokens = {}
    for graphs in (False, True):
        engine = _engine(model_dir, tmp_path, "float32", graphs=graphs, monkeypatch=monkeypatch)
        _generate(engine, [first])
        hits, replays = engine.stats().prefix_hit_tokens, graphs and engine.runner.graphs.replays
        tokens[graphs] = _generate(engine, [second])
        assert engine.stats().prefix_hit_tokens - hits == 512
        if graphs:
            assert engine.runner.graphs.replays - replays == NEW_TOKENS, "the tail step ran eagerly"
    assert tokens[True] == tokens[False]

"""Random traffic through a tight pool: nothing is lost, nothing leaks, every answer is exact.

Requests with shared prefixes arrive at random steps, some are aborted at random moments, the
pool is small enough to preempt, and steps may overlap. Each finished request must carry exactly
the greedy tokens it gets when served alone on a roomy engine; each aborted one must end as
aborted; the pool must be whole at the end.
"""

from __future__ import annotations

import random

import pytest
from conftest import make_engine

from edgepaged import SamplingParams


def _traffic(seed: int) -> list[tuple[int, str, list[int], SamplingParams, int | None]]:
    """(arrival step, id, prompt, sampling, abort step or None) per request; a third carry a
    repetition penalty, so their steps land at once while the others' overlap."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 500) for _ in range(rng.choice([16, 40, 64]))] for _ in range(3)]
    requests = []
    for i in range(14):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 30))]
        arrival = rng.randrange(0, 20)
        abort = arrival + rng.randrange(0, 12) if rng.random() < 0.2 else None
        params = SamplingParams(
            temperature=0.0, max_tokens=rng.randrange(1, 12), ignore_eos=True,
            repetition_penalty=rng.choice([1.0, 1.0, 1.4]),
        )
        requests.append((arrival, f"r{i}", prompt, params, abort))
    return requests


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    """Greedy tokens of a prompt served by itself, memoised across seeds."""
    engine = make_engine(tiny_model_dir, num_kv_blocks=256)
    cache: dict[tuple, list[int]] = {}

    def tokens(prompt: list[int], params: SamplingParams) -> list[int]:
        key = (tuple(prompt), params.max_tokens, params.repetition_penalty)
        if key not in cache:
            engine.add_request("x", prompt, params)
            cache[key] = engine.run_to_completion(["x"])["x"].outputs[0].token_ids
        return cache[key]

    return tokens


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_through_a_tight_pool(tiny_model_dir, alone, seed):
    overlap = seed % 2 == 1
    engine = make_engine(tiny_model_dir, num_kv_blocks=12, max_num_batched_tokens=48, max_num_seqs=6, overlap_steps=overlap)
    traffic = _traffic(seed)
    final, step = {}, 0
    while len(final) < len(traffic):
        for arrival, rid, prompt, params, abort in traffic:
            if arrival == step:
                engine.add_request(rid, prompt, params)
            if abort == step and rid in engine.requests:
                final[rid] = engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 2000, "the engine stopped making progress"
    for _, rid, prompt, params, _ in traffic:
        out = final[rid].outputs[0]
        if out.finish_reason == "abort":
            assert alone(prompt, params)[: len(out.token_ids)] == out.token_ids
        else:
            assert out.finish_reason == "length" and out.token_ids == alone(prompt, params), rid
    engine.step()  # lands a step left in flight, if any
    assert engine.kv.pool.num_used == 0 and engine.kv.pool.num_free == 12
    assert not engine.scheduler.running and not engine.scheduler.waiting

"""Admission that waits for a prefix another request is computing, instead of computing it twice.

Requests that arrive together with the same uncached prefix (a RAG burst, users of one system
prompt at start-up) would each compute it in the same steps. The scheduler admits the first and
holds the others until the first has cached the shared blocks; unrelated requests behind them
are admitted meanwhile, and nothing waits for a sequence that is no longer computing.
"""

from __future__ import annotations

import random

import pytest
from conftest import make_engine, record_schedules

from edgepaged import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _prompts(prefix_len: int, tails: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 500) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(1, 500) for _ in range(n)] for n in tails]


def _run(engine, prompts):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, PARAMS)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    return [final[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("budget", [96, 512], ids=["one-more-fits", "all-fit"])
def test_requests_sharing_an_uncached_prefix_compute_it_once(tiny_model_dir, budget):
    """The first step's budget has room for more than the first request: without waiting, the
    others would start computing the same prefix in that step."""
    prompts = _prompts(64, [5, 9, 3, 12])
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=budget)
    outs = record_schedules(engine)
    got = _run(engine, prompts)
    computed = sum(o.num_tokens for o in outs)
    decode_inputs = len(prompts) * (PARAMS.max_tokens - 1)
    assert computed == 64 + sum(len(p) - 64 for p in prompts) + decode_inputs
    assert engine.stats().prefix_hit_tokens == 3 * 64
    # The same tokens as with no sharing at all.
    assert got == _run(make_engine(tiny_model_dir, enable_prefix_caching=False), prompts)


def test_a_deferred_request_does_not_hold_back_unrelated_ones(tiny_model_dir):
    a, b = _prompts(64, [5, 7])
    unrelated = _prompts(20, [0], seed=9)[0]
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=512)
    for rid, p in (("a", a), ("b", b), ("c", unrelated)):
        engine.add_request(rid, p, PARAMS)
    engine.step()
    assert sorted(s.request.request_id for s in engine.scheduler.running) == ["a", "c"]
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["b"]
    hits = engine.kv.prefix_hit_tokens
    engine.step()
    assert "b" in {s.request.request_id for s in engine.scheduler.running}
    assert engine.kv.prefix_hit_tokens - hits == 64, "b reuses the 4 blocks a cached"


def test_no_one_waits_for_a_request_that_was_aborted(tiny_model_dir):
    a, b = _prompts(64, [5, 7])
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=32)
    engine.add_request("a", a, PARAMS)
    engine.add_request("b", b, PARAMS)
    engine.step()  # a computes its first 32 tokens; b waits for the rest of the prefix
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["b"]
    engine.abort_request("a")
    final = engine.run_to_completion(["b"])
    assert len(final["b"].outputs[0].token_ids) == PARAMS.max_tokens
    assert engine.kv.pool.num_used == 0

"""SamplingParams refuses what the sampler cannot represent, and accepts every bound it allows:
each accepted extreme is run through one batched step beside an ordinary sampled request."""

from __future__ import annotations

import math

import pytest
import torch

from edgepaged.engine import LLMEngine
from edgepaged.sampling import MAX_TOP_K, SEED_RANGE, SamplingParams, make_generator


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", 2**63),
        ("top_k", MAX_TOP_K + 1),
        ("top_k", -2),
        ("top_k", True),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", math.nan),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -math.inf),
        ("repetition_penalty", math.inf),
        ("logprobs", 21),
        ("max_tokens", True),
    ],
)
def test_unrepresentable_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("seed", [SEED_RANGE[0], -1, 0, SEED_RANGE[1]])
def test_every_accepted_seed_seeds_a_generator(seed):
    SamplingParams(seed=seed)
    assert make_generator(seed, 3, torch.device("cpu")) is not None
    torch.Generator().manual_seed(seed)  # the range is what torch accepts


def test_extreme_accepted_values_share_a_sampled_step(tiny_model_dir):
    engine = LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=64)
    extremes = {
        "top-k-max": SamplingParams(temperature=1.0, top_k=MAX_TOP_K, seed=SEED_RANGE[1], max_tokens=6, ignore_eos=True),
        "top-k-off": SamplingParams(temperature=1.0, top_k=0, seed=SEED_RANGE[0], max_tokens=6, ignore_eos=True),
        "plain": SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True),
    }
    for rid, params in extremes.items():
        engine.add_request(rid, "Hello there", params)
    done = engine.run_to_completion(list(extremes))
    assert all(len(done[rid].outputs[0].token_ids) == 6 for rid in extremes)


def test_default_queue_bound_follows_the_boxs_speed():
    from edgepaged.server import queue_bound

    # 32 slots, 128-token answers: a slot frees every 128 * step / 32 s; 30 s holds that many.
    assert queue_bound(32, step_s=0.05, max_wait_s=30, cap=256) == 150
    assert queue_bound(32, step_s=0.5, max_wait_s=30, cap=256) == 15  # a slow box refuses early
    assert queue_bound(32, step_s=0.001, max_wait_s=30, cap=256) == 256  # the profile's cap holds
    assert queue_bound(1, step_s=10.0, max_wait_s=1, cap=256) == 1  # one may always wait

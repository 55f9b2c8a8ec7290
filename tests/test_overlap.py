"""Overlapped steps (`overlap_steps`) give exactly the tokens of one step at a time.

With overlap a step is launched before the previous step's tokens reach the host: its inputs
come from the device, stop checks run one step late and the extra token of a stopped sequence
is dropped. On the CPU overlap changes nothing but the order of work, so these tests check the
bookkeeping against the same engine without it; on a GPU the first three also run on CUDA, where
the tokens really are read while the next step runs.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_engine, record_schedules

from edgepaged import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _engine(folder, overlap: bool, device: str, **overrides):
    return make_engine(folder, overlap_steps=overlap, device=torch.device(device), **overrides)


def _run(engine, prompts, params):
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    assert not engine.has_unfinished_requests()
    return [[(o.token_ids, o.finish_reason, o.logprobs) for o in final[str(i)].outputs] for i in range(len(prompts))]


def _same(a, b) -> bool:
    """Same tokens and finish reasons; log-probabilities within float noise (a preempted
    sequence recomputes in other batches; near-tied alternatives may swap, so only the chosen
    tokens' values are compared)."""
    for ra, rb in zip(a, b, strict=True):
        for (ids_a, fin_a, lp_a), (ids_b, fin_b, lp_b) in zip(ra, rb, strict=True):
            if ids_a != ids_b or fin_a != fin_b or (lp_a is None) != (lp_b is None):
                return False
            if lp_a is not None and any(abs(x.logprob - y.logprob) > 1e-3 for x, y in zip(lp_a, lp_b, strict=True)):
                return False
    return True


def _prompts(n: int = 8, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, 512) for _ in range(40)]
    return [shared + [rng.randrange(1, 512) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, n=3, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.2),
    ],
    ids=["greedy", "seeded-n3", "penalties"],
)
@pytest.mark.parametrize("num_kv_blocks", [256, 14], ids=["roomy", "preempting"])
def test_overlap_gives_the_same_tokens(tiny_model_dir, device, params, num_kv_blocks):
    results, engines = [], []
    for overlap in (False, True):
        engine = _engine(tiny_model_dir, overlap, device, num_kv_blocks=num_kv_blocks, max_num_batched_tokens=64)
        results.append(_run(engine, _prompts(), params))
        engines.append(engine)
    assert _same(results[0], results[1])
    if num_kv_blocks == 14:
        assert engines[1].stats().num_preemptions > 0, "the tight pool should preempt"
    for engine in engines:
        assert engine.kv.pool.num_used == 0 and engine.kv.pool.num_free == num_kv_blocks


@pytest.mark.parametrize("device", DEVICES)
def test_a_stop_read_one_step_late_drops_the_extra_token(tiny_model_dir, device):
    """A stop token, a stop string and max_tokens end each sequence where the synchronous
    engine ends it, though the overlapped one has already computed a token past it."""
    base = _run(_engine(tiny_model_dir, False, device), [[7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    ids = base[0][0][0]
    stop_id = ids[5]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
    ]
    for params in cases:
        want = _run(_engine(tiny_model_dir, False, device), [[7, 8, 9]] * 3, params)
        engine = _engine(tiny_model_dir, True, device)
        got = _run(engine, [[7, 8, 9]] * 3, params)
        assert got == want
        assert engine.kv.pool.num_used == 0
    assert want[0][0][0] == ids[:9]


def test_overlap_never_schedules_past_max_tokens(tiny_model_dir):
    """The scheduler knows a sequence's last token is on the device and runs nothing more."""
    engine = _engine(tiny_model_dir, True, "cpu")
    outs = record_schedules(engine)
    prompt = list(range(1, 21))
    _run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    # The prompt once, then each output token but the last as the next step's input.
    assert sum(o.num_tokens for o in outs) == len(prompt) + 6 - 1


def test_abort_while_a_step_is_in_flight(tiny_model_dir):
    engine = _engine(tiny_model_dir, True, "cpu")
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", list(range(1, 40)), params)
    engine.add_request("b", list(range(50, 70)), params)
    for _ in range(4):
        engine.step()
    assert engine.pipeline.in_flight is not None
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    landed = [o for o in engine.step() if o.request_id == "a"]
    assert not landed, "the aborted request's in-flight token is dropped"
    final = engine.run_to_completion(["b"])
    assert len(final["b"].outputs[0].token_ids) == 50
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished_requests()


def test_streamed_text_stays_append_only_with_overlap(tiny_model_dir):
    engine = _engine(tiny_model_dir, True, "cpu")
    engine.add_request("s", "Tell me", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=["zzzz"]))
    seen = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.outputs[0].text.startswith(seen)
            seen = out.outputs[0].text
    assert seen == engine.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)

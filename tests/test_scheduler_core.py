"""The scheduler over a real KV manager and no model: exact admissions, step by step.

The test plays the model runner: every chunk that completes its sequence's tokens "samples" a
token, which lands at once. Nothing here loads weights, so each case states precisely which
sequences a step admits and how many tokens each computes.
"""

from __future__ import annotations

import itertools
import random

import pytest

from edgepaged.cache import KVCacheManager
from edgepaged.sampling import SamplingParams
from edgepaged.scheduler import Scheduler, SchedulerOutput
from edgepaged.sequence import Request, Sequence, SequenceStatus

BS = 8
_SEQ_IDS = itertools.count()


def _scheduler(num_blocks: int, max_num_seqs: int = 256, budget: int = 2048, caching: bool = True) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BS, caching), max_num_seqs, budget)


def _add(sched: Scheduler, prompts: list[list[int]], max_tokens: int = 4) -> list[Sequence]:
    seqs = []
    for i, ids in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        request = Request(str(i), list(ids), params, len(ids) + max_tokens, frozenset())
        seq = Sequence(next(_SEQ_IDS), request, list(ids))
        request.sequences.append(seq)
        sched.add(seq)
        seqs.append(seq)
    return seqs


def _step(sched: Scheduler) -> SchedulerOutput:
    """One step: sampled chunks land a token; a sequence with all its tokens finishes."""
    out = sched.schedule()
    for chunk in out.chunks:
        seq = chunk.seq
        if chunk.completes_prompt:
            sched.append_token(seq, 7)
            if seq.num_output_tokens >= seq.request.params.max_tokens:
                sched.finish(seq, "length")
    return out


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30000) for _ in range(n)]


def test_identical_prompts_arriving_together_compute_the_prompt_once():
    """256 copies of one 1,024-token prompt: the first computes it, the other 255 are admitted
    together by the next step, each recomputing only its last token into a copy of the shared
    last block."""
    sched = _scheduler(num_blocks=4096)
    prompt = _prompt(1024)
    seqs = _add(sched, [prompt] * 256)
    first = _step(sched)
    assert [(c.seq, c.num_tokens) for c in first.chunks] == [(seqs[0], 1024)]
    assert len(sched.waiting) == 255
    second = _step(sched)
    assert len(second.chunks) == 256 and all(c.num_tokens == 1 for c in second.chunks)
    assert not sched.waiting
    last_block = sched.kv.block_ids(seqs[0].seq_id)[127]
    assert len(second.block_copies) == 255 and all(src == last_block for src, _ in second.block_copies)
    # The prompt's first 127 blocks are held once, for all 256 sequences.
    tables = [sched.kv.block_ids(s.seq_id) for s in seqs]
    assert all(t[:127] == tables[0][:127] for t in tables)
    assert sched.kv.pool.blocks[tables[0][0]].ref_count == 256
    assert sched.kv.prefix_hit_tokens == 255 * 1023


def test_prompts_differing_in_their_tails_wait_once_then_fill_the_budget():
    sched = _scheduler(num_blocks=4096, budget=2048)
    shared = _prompt(1008)
    prompts = [shared + _prompt(16, seed=i + 1) for i in range(256)]
    _add(sched, prompts)
    assert [c.num_tokens for c in _step(sched).chunks] == [1024]
    second = _step(sched)
    # One decode, then as many 16-token tails as the 2,048-token budget holds, the last cut short.
    assert [c.num_tokens for c in second.chunks] == [1] + [16] * 127 + [15]
    steps = 2
    while sched.waiting:
        out = _step(sched)
        assert out.num_tokens == 2048 or not sched.waiting, "the budget is filled while requests wait"
        steps += 1
    assert steps == 4
    assert sched.kv.prefix_hit_tokens == 255 * 1008, "the shared 1,008 tokens were computed once"


def test_a_prompt_cached_to_its_end_reuses_its_last_block_in_place():
    """After the only holder finished, the cached blocks are free: the new prompt takes them
    all back and recomputes its last token into the last one, with no copy."""
    sched = _scheduler(num_blocks=64)
    prompt = _prompt(64)
    (a,) = _add(sched, [prompt], max_tokens=1)
    _step(sched)
    assert a.status is SequenceStatus.FINISHED and sched.kv.pool.num_used == 0
    (b,) = _add(sched, [prompt], max_tokens=1)
    out = _step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(63, 1)]
    assert out.block_copies == []
    assert b.output_token_ids == [7]


def test_each_waiting_request_is_looked_up_at_most_twice(monkeypatch):
    """Requests waiting for a prefix in progress are looked up when it is, and again when they
    are admitted: never once per step (which was quadratic in the burst)."""
    sched = _scheduler(num_blocks=8192, budget=2048)
    _add(sched, [_prompt(1500)] * 200)
    lookups = []
    find = sched.kv.find_prefix
    monkeypatch.setattr(sched.kv, "find_prefix", lambda seq: lookups.append(seq.seq_id) or find(seq))
    while sched.waiting:
        _step(sched)
    assert len(lookups) <= 2 * 200


def test_admission_stops_at_the_first_request_the_pool_cannot_hold():
    """Blocks, not the budget, decide: 10 blocks of 8 hold two 33-token prompts (5 blocks
    each), not a third; it is admitted when the first two finish."""
    sched = _scheduler(num_blocks=10, caching=False)
    seqs = _add(sched, [_prompt(33, seed=i) for i in range(3)], max_tokens=2)
    out = _step(sched)
    assert [c.seq for c in out.chunks] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]
    _step(sched)  # both decode their second token and finish
    assert all(s.status is SequenceStatus.FINISHED for s in seqs[:2])
    assert [c.seq for c in _step(sched).chunks] == [seqs[2]]


def test_preemption_returns_the_newest_sequence_to_the_front_of_the_queue():
    """Two sequences fill the pool exactly; when the older needs a new block, the newer one is
    preempted (its blocks freed, its progress reset) and recomputed once there is room."""
    sched = _scheduler(num_blocks=4, caching=False)
    old, new = _add(sched, [_prompt(16, seed=1), _prompt(15, seed=2)], max_tokens=8)
    _step(sched)
    assert sched.kv.pool.num_free == 0
    out = _step(sched)  # old's 17th token needs a third block: new goes
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new] and [c.seq for c in out.chunks] == [old]
    while old.status is not SequenceStatus.FINISHED:
        _step(sched)
    out = _step(sched)
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(new, 0, 16)]
    assert sched.num_preemptions == 1


@pytest.mark.parametrize("caching", [True, False])
def test_one_token_chunks_come_first(caching):
    """The runner's layout: decodes before prefill chunks, whatever the admission order."""
    sched = _scheduler(num_blocks=256, caching=caching)
    _add(sched, [_prompt(20, seed=1)])
    _step(sched)
    _add(sched, [_prompt(30, seed=2)])
    out = _step(sched)
    assert [c.num_tokens for c in out.chunks] == [1, 30]

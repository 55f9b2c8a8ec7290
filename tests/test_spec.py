"""Speculative decoding by prompt lookup (speculative.py): drafts, verification, KV rollback.

Greedy requests must give the plain greedy output token for token (exactly, on fp32 random
models), sampled ones the plain distribution (checked on the rejection sampler itself, with a
chi-square test on a tiny vocabulary). The engine tests also force drafts the model rejects
(an "oracle" drafter that copies the true continuation with one token corrupted), so partial
acceptance, rollback across block boundaries and stops inside a verified draft all occur.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_engine

from edgepaged import SamplingParams
from edgepaged.sampling import MAX_SPECULATIVE, SamplingRow, probabilities
from edgepaged.speculative import FIRST_PAUSE, MISS_LIMIT, PromptLookup, accepted_tokens, verify


# -- the drafter -------------------------------------------------------------------------------
def test_the_longest_matching_suffix_wins_over_a_later_shorter_one():
    tokens = [5, 1, 2, 3, 7, 8, 9, 2, 3, 6, 6, 1, 2, 3]
    assert PromptLookup().propose(tokens, 3) == [7, 8, 9]  # (1, 2, 3), not the later (2, 3)


def test_the_latest_occurrence_is_copied_unless_too_close_to_the_end():
    assert PromptLookup().propose([1, 2, 10, 11, 12, 1, 2, 20, 21, 22, 0, 1, 2], 3) == [20, 21, 22]
    # (1, 2) last occurred just before the suffix: too close for 3 tokens, so the first occurrence
    assert PromptLookup().propose([1, 2, 10, 11, 5, 1, 2, 1, 2], 3) == [10, 11, 5]
    assert PromptLookup().propose([1, 2, 10, 1, 2], 8) == [10, 1, 2]  # what there is, at most k


def test_no_draft_without_an_earlier_occurrence():
    assert PromptLookup().propose([1, 2, 3, 4, 5, 6], 4) == []
    assert PromptLookup().propose([7], 4) == []


def test_an_incremental_index_drafts_as_a_fresh_one():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(40)]
    growing = PromptLookup()
    for end in range(1, len(tokens) + 1):
        k = rng.randrange(1, 6)
        assert growing.propose(tokens[:end], k) == PromptLookup().propose(tokens[:end], k), end


def test_drafting_pauses_after_misses_and_the_pause_doubles():
    tokens = [1, 2, 3, 1, 2]
    d = PromptLookup()

    def run_of_misses() -> int:
        for _ in range(MISS_LIMIT):
            assert d.propose(tokens, 2)
            d.record(0, 2)
        skipped = 0
        while not d.propose(tokens, 2):
            skipped += 1
        return skipped

    assert run_of_misses() == FIRST_PAUSE - 1
    assert run_of_misses() == 2 * FIRST_PAUSE - 1
    d.record(1, 1)  # an accepted draft resets the pause
    assert run_of_misses() == FIRST_PAUSE - 1


def test_the_draft_length_follows_what_the_model_keeps():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]  # (1, 2) was followed by 3..10
    d = PromptLookup()
    assert d.propose(tokens, 6) == [3, 4, 5, 6, 7, 8]  # before any verify step: as many as asked
    d.record(1, 6)  # kept one of six: one more than that next time
    assert d.propose(tokens, 6) == [3, 4]
    d.record(2, 2)  # kept both: twice as many
    assert d.propose(tokens, 6) == [3, 4, 5, 6]
    d.record(4, 4)
    assert d.propose(tokens, 6) == [3, 4, 5, 6, 7, 8]  # never more than asked
    d.record(0, 6)  # a miss: a single draft next time
    assert d.propose(tokens, 6) == [3]


def test_accepted_tokens_keep_the_leading_accepted_drafts_then_one_more():
    assert accepted_tokens([5, 6, 7], [True, False, True, False], [50, 60, 70, 80]) == [5, 60]
    assert accepted_tokens([5, 6, 7], [True, True, True, False], [50, 60, 70, 80]) == [5, 6, 7, 80]
    assert accepted_tokens([5, 6, 7], [False, True, True, False], [50, 60, 70, 80]) == [50]


# -- the rejection sampler ---------------------------------------------------------------------
def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# The 0.9999 quantile of chi-square with 5 degrees of freedom: a correct sampler fails 1 in 10^4.
CHI2_5_DOF_9999 = 25.74


@pytest.mark.parametrize(
    "params,drafts",
    [
        (SamplingParams(temperature=0.8), (2, 4)),
        (SamplingParams(temperature=1.3, top_k=4, seed=1), (2, 4)),
        (SamplingParams(temperature=1.0, top_p=0.8), (0, 5)),
    ],
    ids=["temperature", "top-k-seeded", "top-p"],
)
def test_verified_tokens_are_distributed_as_plain_sampling(params, drafts):
    """Every landed position has the plain distribution of its row: the first token p0; the
    second, given the first draft was kept, p1; the bonus, given both were, p2."""
    torch.manual_seed(0)
    vocab, n = 6, 60_000
    logits = torch.randn(3, vocab) * 1.5
    if params.top_k > 0:  # make a draft the top-k mask removes: it must never be kept
        logits[0, drafts[0]] = logits[0].min() - 1
    gen = torch.Generator().manual_seed(7) if params.seed is not None else None
    rows = [SamplingRow(params, gen) for _ in range(3 * n)]
    targets = torch.tensor([drafts[0], drafts[1], -1] * n)
    accept, tokens = verify(logits.repeat(n, 1), rows, targets)
    accept, tokens = accept.view(n, 3), tokens.view(n, 3)
    expected = probabilities(logits, rows[:3])
    first = torch.where(accept[:, 0], drafts[0], tokens[:, 0])
    second = torch.where(accept[:, 1], drafts[1], tokens[:, 1])[accept[:, 0]]
    bonus = tokens[:, 2][accept[:, 0] & accept[:, 1]]
    for landed, p in ((first, expected[0]), (second, expected[1]), (bonus, expected[2])):
        if landed.numel() < 2_000:
            continue  # too few kept drafts to test this position (a draft of low probability)
        counts = torch.bincount(landed, minlength=vocab).double()
        assert _chi_square(counts, p.double()) < CHI2_5_DOF_9999
    assert abs(accept[:, 0].double().mean() - expected[0, drafts[0]]) < 0.01  # kept with probability p0(x)


def test_a_seeded_verify_is_reproducible():
    logits = torch.randn(4, 10)
    targets = torch.tensor([1, 2, 3, -1])

    def draw():
        gen = torch.Generator().manual_seed(11)
        return verify(logits, [SamplingRow(SamplingParams(temperature=1.0), gen)] * 4, targets)

    a, b = draw(), draw()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_greedy_verify_keeps_a_draft_exactly_when_it_is_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    accept, tokens = verify(logits, [SamplingRow(SamplingParams(temperature=0.0))] * 3, torch.tensor([1, 2, -1]))
    assert accept.tolist() == [True, False, False] and tokens.tolist() == [1, 0, 2]


# -- the engine --------------------------------------------------------------------------------
def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a passage, so prompt lookup finds drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        passage = [rng.randrange(1, 400) for _ in range(rng.randrange(10, 30))]
        out.append(passage * 2 + [rng.randrange(1, 400) for _ in range(rng.randrange(1, 12))])
    return out


def _run(engine, prompts, params_list, check=None):
    ids = [str(i) for i in range(len(prompts))]
    for rid, ids_, params in zip(ids, prompts, params_list):
        engine.add_request(rid, ids_, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if check is not None:
            check(engine)
    return [[(c.token_ids, c.finish_reason) for c in final[rid].outputs] for rid in ids]


class _Oracle:
    """A drafter that knows each sequence's plain greedy continuation and corrupts one draft
    position in two: the model keeps some drafts and rejects the rest."""

    def __init__(self, references: list[list[int]], seed: int = 0):
        self.references = references
        self.rng = random.Random(seed)

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        for ref in self.references:
            if ref[: len(token_ids)] == token_ids:
                draft = ref[len(token_ids) : len(token_ids) + k]
                if draft and self.rng.random() < 0.5:
                    draft[self.rng.randrange(len(draft))] = self.rng.randrange(1, 400)
                return draft
        return [self.rng.randrange(1, 400) for _ in range(k)]


def _with_oracle(monkeypatch, references):
    oracle = _Oracle(references)
    monkeypatch.setattr(PromptLookup, "propose", lambda self, token_ids, k: oracle.propose(token_ids, k))
    monkeypatch.setattr(PromptLookup, "record", lambda self, num_accepted, num_drafts: None)


def _blocks_match_computed(engine) -> None:
    """After a step has landed, every decoding sequence holds exactly the blocks of its computed
    tokens: those past a verify step's accepted position went back to the pool."""
    kv = engine.kv
    for seq in engine.scheduler.running:
        if seq.num_computed_tokens == len(seq.token_ids) - 1:
            assert kv.num_table_blocks(seq.seq_id) == kv.blocks_needed(seq.num_computed_tokens), seq.seq_id


GREEDY = dict(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["one-step", "overlapped"])
def test_greedy_with_prompt_lookup_equals_plain_greedy(tiny_model_dir, overlap):
    prompts = _prompts(6)
    spec = [
        SamplingParams(**GREEDY, speculative=4),
        SamplingParams(**GREEDY, speculative=MAX_SPECULATIVE),
        SamplingParams(**GREEDY, speculative=2, repetition_penalty=1.2, frequency_penalty=0.3),
        SamplingParams(**GREEDY),  # a plain request in the same steps
        SamplingParams(**GREEDY, speculative=3, presence_penalty=0.5),
        SamplingParams(**GREEDY, speculative=1),
    ]
    penalties = {2: dict(repetition_penalty=1.2, frequency_penalty=0.3), 4: dict(presence_penalty=0.5)}
    plain = [SamplingParams(**GREEDY, **penalties.get(i, {})) for i in range(6)]
    expected = _run(make_engine(tiny_model_dir, block_size=4), prompts, plain)
    engine = make_engine(tiny_model_dir, block_size=4, overlap_steps=overlap)
    assert _run(engine, prompts, spec, _blocks_match_computed) == expected
    stats = engine.stats()
    assert stats.accepted_draft_tokens > 20, "prompt lookup found nothing to copy: the test exercises nothing"
    assert engine.kv.pool.num_used == 0


def test_rejected_drafts_are_rolled_back_and_never_cached(tiny_model_dir, monkeypatch):
    """Half the drafts carry a wrong token. After every step each cached block must hold the
    keys and values plain decoding computes for its tokens: a block indexed while it held a
    rejected draft's KV would serve them to the next prompt with that prefix."""
    prompts = _prompts(4, seed=1)
    plain_params = [SamplingParams(**GREEDY)] * 4
    ref_engine = make_engine(tiny_model_dir, block_size=4)
    expected = _run(ref_engine, prompts, plain_params)
    ref_kv, ref_cache = ref_engine.runner.kv_cache, ref_engine.kv.pool.cached
    _with_oracle(monkeypatch, [p + out[0][0] for p, out in zip(prompts, expected)])
    compared = []

    def check(engine):
        _blocks_match_computed(engine)
        kv = engine.runner.kv_cache
        for block_hash, block in engine.kv.pool.cached.items():
            ref_block = ref_cache[block_hash]  # every real prefix is in the plain run's cache
            torch.testing.assert_close(kv[:, :, block.block_id], ref_kv[:, :, ref_block.block_id], atol=1e-4, rtol=1e-4)
            compared.append(block_hash)

    engine = make_engine(tiny_model_dir, block_size=4)
    got = _run(engine, prompts, [SamplingParams(**GREEDY, speculative=5)] * 4, check)
    assert got == expected
    stats = engine.stats()
    assert 0 < stats.accepted_draft_tokens < stats.draft_tokens  # some kept, some rejected
    assert len(set(compared)) > 20
    assert engine.kv.pool.num_used == 0


def test_a_stop_inside_a_verified_draft_ends_the_output_there(tiny_model_dir, monkeypatch):
    prompts = _prompts(3, seed=2)
    long = _run(make_engine(tiny_model_dir), prompts, [SamplingParams(**GREEDY)] * 3)
    stops = [out[0][0][17] for out in long]  # a token each answer reaches mid-way
    plain = [SamplingParams(**GREEDY, stop_token_ids=[s]) for s in stops]
    expected = _run(make_engine(tiny_model_dir), prompts, plain)
    _with_oracle(monkeypatch, [p + out[0][0] for p, out in zip(prompts, long)])
    spec = [SamplingParams(**GREEDY, stop_token_ids=[s], speculative=8) for s in stops]
    engine = make_engine(tiny_model_dir)
    assert _run(engine, prompts, spec) == expected
    assert all(out[0][1] == "stop" for out in expected)
    assert engine.kv.pool.num_used == 0


def test_sampled_speculative_requests_run_and_reproduce_with_a_seed(tiny_model_dir, monkeypatch):
    """Sampled from a random model the text copies nothing, so the drafts here are random tokens
    (rejected but for a rare luck): the sampled verify path, its rollback and its seeding."""
    _with_oracle(monkeypatch, [])
    prompts = _prompts(3, seed=3)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=4, n=2, max_tokens=24, ignore_eos=True, speculative=4)] * 3

    def run():
        engine = make_engine(tiny_model_dir)
        out = _run(engine, prompts, params)
        return out, engine.stats()

    (a, stats), (b, _) = run(), run()
    assert a == b
    assert all(len(ids) == 24 for outs in a for ids, _ in outs)
    assert stats.draft_tokens > 0


def test_outputs_report_the_accepted_drafts(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    engine.add_request("r", _prompts(1)[0], SamplingParams(**GREEDY, speculative=4))
    out = engine.run_to_completion(["r"])["r"]
    m = out.metrics
    assert m["verify_steps"] > 0 and 0 < m["accepted_draft_tokens"] <= m["draft_tokens"] <= 4 * m["verify_steps"]
    assert engine.stats().accepted_draft_tokens == m["accepted_draft_tokens"]


def test_drafts_fit_the_budget_and_the_remaining_length(tiny_model_dir):
    from conftest import record_schedules

    engine = make_engine(tiny_model_dir, max_num_batched_tokens=3)
    scheds = record_schedules(engine)
    engine.add_request("r", _prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, speculative=8))
    out = engine.run_to_completion(["r"])["r"]
    assert len(out.outputs[0].token_ids) == 7
    drafts = [c for s in scheds for c in s.chunks if c.draft]
    assert drafts and all(c.num_tokens <= 3 for c in drafts)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(speculative=-1), "speculative must be an integer"),
        (dict(speculative=MAX_SPECULATIVE + 1), "speculative must be an integer"),
        (dict(speculative=True), "speculative must be an integer"),
        (dict(speculative=2.0), "speculative must be an integer"),
        (dict(speculative=4, beam_width=2, temperature=0.0), "not supported with beam search"),
        (dict(speculative=4, logprobs=1), "logprobs are not supported with speculative"),
    ],
)
def test_what_speculation_cannot_honour_is_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_the_server_takes_a_speculative_field(tiny_model_dir):
    import httpx
    from test_server import AUTH, KEY, KV_BLOCKS, MODEL, live_server

    from edgepaged.engine import LLMEngine
    from edgepaged.server.async_engine import AdmissionLimits

    prompt = _prompts(1, seed=5)[0]
    offline = make_engine(tiny_model_dir)
    offline.add_request("ref", prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    expected = offline.run_to_completion(["ref"])["ref"].outputs[0].text
    engine = LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=KV_BLOCKS)
    with live_server(engine, AdmissionLimits(64, 1 << 20), api_key=KEY) as live:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "speculative": 4}
        reply = httpx.post(f"{live.url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        m = live.metrics()
    assert 0 < m["edgepaged_spec_accepted_tokens_total"] <= m["edgepaged_spec_draft_tokens_total"]


# -- the default model -------------------------------------------------------------------------
# Where plain decoding's top two logits are this close, a (1 + k)-row verify pass (other matmul
# shapes, other rounding in the 4-bit kernels) may pick the other one: a near-tie, not a bug.
NEAR_TIE = 0.5

RAG_PROMPT = (
    "Answer from the passage, quoting it.\n\nPassage: The json module's dumps function serializes obj "
    "to a JSON formatted str. If skipkeys is true, dict keys that are not of a basic type are skipped "
    "instead of raising a TypeError. If ensure_ascii is true, the output is guaranteed to have all "
    "incoming non-ASCII characters escaped. If indent is a non-negative integer or string, JSON array "
    "elements and object members will be pretty-printed with that indent level.\n\n"
    "Question: What does json.dumps do with skipkeys and indent?"
)


@pytest.mark.slow
def test_default_model_greedy_parity_up_to_near_ties(default_model_dir):
    from edgepaged.engine import LLMEngine

    engine = LLMEngine.from_model(None, "cpu", max_kv_blocks=256)
    prompt = engine.apply_chat_template([{"role": "user", "content": RAG_PROMPT}])

    def greedy(ids, max_tokens, **kw):
        rid = f"r{random.random()}"
        engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw))
        return engine.run_to_completion([rid])[rid]

    plain = greedy(prompt, 96).outputs[0].token_ids
    before = engine.stats().accepted_draft_tokens
    spec = greedy(prompt, 96, speculative=6).outputs[0].token_ids
    assert engine.stats().accepted_draft_tokens - before > 10, "the answer copied nothing from the passage"
    same = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    if same is None:
        assert plain == spec
        return
    # The first difference: the plain path's own logits there must be a near-tie between the two.
    top = greedy(prompt + plain[:same], 1, logprobs=2).outputs[0].logprobs[0]
    (first, _, lp1), (second, _, lp2) = top.top[:2]
    assert {first, second} == {plain[same], spec[same]}
    assert lp1 - lp2 < NEAR_TIE, f"token {same}: a gap of {lp1 - lp2:.3f} is no near-tie"

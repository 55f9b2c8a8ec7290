"""Beam search: transformers' answers token for token, over shared blocks, beside other requests.

The reference is `generate(num_beams=k, do_sample=False)` on the same random-weight folder in
float32. Weights are drawn wider than the tiny model's default so that beams diverge (at 0.08
every beam repeats one token), and a stop token is picked from a first run so that finished
hypotheses (a beam ending early, scored at its own length) decide the answer.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import make_engine
from transformers import AutoModelForCausalLM

from edgepaged import LLM, RequestError, SamplingParams
from edgepaged.models.random_init import write_random_model

VOCAB = 512
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("beam-llama"), "tiny-llama", vocab_size=VOCAB, std=0.15)


@pytest.fixture(scope="module")
def reference(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def generate(ids, k, eos=None, num_return=None, length_penalty=1.0, early_stopping=False, new_tokens=NEW_TOKENS):
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            num_beams=k, num_return_sequences=num_return or k, max_new_tokens=new_tokens, pad_token_id=0,
            eos_token_id=eos, length_penalty=length_penalty, early_stopping=early_stopping,
            return_dict_in_generate=True, output_scores=True,
        )
        lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
        return [
            (out.sequences[i, len(ids) : len(ids) + n].tolist(), out.sequences_scores[i].item())
            for i, n in enumerate(lengths)
        ]

    return generate


@pytest.fixture(scope="module")
def engine(folder):
    return make_engine(folder)


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 17, 40)]


def _beam_params(k, eos=None, n=None, **kw):
    """ignore_eos with the stop token as stop_token_ids: the engine's stop set is exactly {eos}."""
    return SamplingParams(
        n=n or k, beam_width=k, max_tokens=kw.pop("max_tokens", NEW_TOKENS), ignore_eos=True,
        stop_token_ids=[eos] if eos is not None else None, **kw,
    )


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    done = engine.run_to_completion(list(requests))
    assert not engine.has_unfinished_requests() and engine.kv.pool.num_used == 0
    return done


CASES = [
    # (k, length_penalty, early_stopping, n returned)
    (2, 1.0, False, None),
    (4, 1.0, False, None),
    (4, 1.0, False, 1),
    (4, 2.0, True, None),
    (2, 1.0, "never", None),  # ends later than False would, on the second prompt
    (4, -1.0, False, None),
]


@pytest.mark.parametrize("with_eos", [False, True], ids=["no-eos", "eos"])
@pytest.mark.parametrize("k,length_penalty,early_stopping,n", CASES, ids=lambda v: str(v))
def test_matches_transformers_token_for_token(engine, reference, k, length_penalty, early_stopping, n, with_eos):
    prompts = _prompts(seed=k)
    finished_early = 0
    requests, expected = {}, {}
    for i, ids in enumerate(prompts):
        eos = reference(ids, k)[0][0][3] if with_eos else None  # a token the best beam picks
        opts = dict(length_penalty=length_penalty, early_stopping=early_stopping)
        expected[str(i)] = reference(ids, k, eos=eos, num_return=n, **opts)
        requests[str(i)] = (ids, _beam_params(k, eos, n=n, **opts))
    done = _run(engine, requests)
    for rid, want in expected.items():
        got = done[rid].outputs
        assert [o.token_ids for o in got] == [w[0] for w in want], f"prompt {rid}"
        for o, (_, score) in zip(got, want):
            assert o.score == pytest.approx(score, rel=1e-5, abs=1e-4)
            assert o.score == pytest.approx(o.cumulative_logprob / len(o.token_ids) ** length_penalty)
        assert [o.index for o in got] == list(range(len(want)))
        assert all(a.score >= b.score for a, b in zip(got, got[1:])), "best first"
        finished_early += sum(o.finish_reason == "stop" and len(o.token_ids) < NEW_TOKENS for o in got)
        if not with_eos:
            assert all(o.finish_reason == "length" and len(o.token_ids) == NEW_TOKENS for o in got)
    if with_eos:
        assert finished_early, "no beam that stopped early was returned: the hypothesis path went untested"


def test_prompt_blocks_are_held_once_and_dropped_beams_free_theirs_at_once(engine):
    k = 4
    prompt = list(range(100, 140))  # 40 tokens: 2 full blocks and 8 tokens of a partial one
    engine.add_request("b", prompt, _beam_params(k, max_tokens=30))
    request = engine.requests["b"]
    pool = engine.kv.pool
    engine.step()  # prefill, the first choice, and the fork: four beams on the prompt's blocks
    beams = request.sequences
    assert len(beams) == k
    tables = [engine.kv.block_ids(s.seq_id) for s in beams]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 3
    prompt_blocks = [pool.blocks[b] for b in tables[0][:2]]
    assert [b.ref_count for b in prompt_blocks] == [k, k]
    assert pool.num_used == 3  # the prompt is stored once for all four beams
    prompt_tail = tables[0][2]  # copied on the first write of each beam but one
    seen, dropped, shared_history = set(), 0, False
    while "b" in engine.requests:
        live = {s.seq_id for s in request.sequences}
        for seq_id in seen - live:  # dropped since: its table is gone, at once
            assert seq_id not in engine.kv.tables
        dropped += len(seen - live)
        seen = live
        tables = [engine.kv.block_ids(s.seq_id) for s in request.sequences]
        assert pool.num_used == len(set().union(*map(set, tables))), "every used block belongs to a live beam"
        assert [b.ref_count for b in prompt_blocks] == [k, k]
        generated = Counter(b for t in tables for b in t[2:] if b != prompt_tail)
        shared_history |= max(generated.values(), default=0) > 1  # a fork shares its parent's own blocks
        engine.step()
    assert dropped > 0, "no beam was dropped: pick a longer search"
    assert shared_history, "beams never shared blocks past the prompt"
    assert pool.num_used == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize("overlap", [False, True], ids=["one-at-a-time", "overlap"])
def test_ordinary_requests_beside_a_beam_request_are_unchanged(folder, overlap):
    prompts = _prompts(seed=9)
    ordinary = {
        "greedy": (prompts[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)),
        "sampled": (prompts[1], SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=20, ignore_eos=True)),
    }
    beam = {"beam": (prompts[2], _beam_params(4, max_tokens=20))}
    alone = _run(make_engine(folder, overlap_steps=overlap), ordinary)
    beam_alone = _run(make_engine(folder, overlap_steps=overlap), beam)
    together = _run(make_engine(folder, overlap_steps=overlap), {**ordinary, **beam})
    for rid in ordinary:
        assert [o.token_ids for o in together[rid].outputs] == [o.token_ids for o in alone[rid].outputs]
    lp_alone, lp_together = alone["greedy"].outputs[0].logprobs, together["greedy"].outputs[0].logprobs
    assert [e.logprob for e in lp_together] == pytest.approx([e.logprob for e in lp_alone], abs=1e-4)
    assert [len(e.top) for e in lp_together] == [2] * 20  # its own logprobs count, not the beams' candidates
    assert [o.token_ids for o in together["beam"].outputs] == [o.token_ids for o in beam_alone["beam"].outputs]


def test_beams_split_across_steps_and_preempted_give_the_same_answer(folder):
    """A token budget smaller than the group schedules its beams over several steps (a beam that
    landed waits for its siblings); a tight pool preempts beams, which recompute and rejoin."""
    prompts = _prompts(seed=4)
    requests = {
        "beam": (prompts[1], _beam_params(4, max_tokens=24)),
        "other": (prompts[2], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
    }
    roomy = _run(make_engine(folder), requests)
    split = _run(make_engine(folder, max_num_batched_tokens=3), requests)
    tight_engine = make_engine(folder, num_kv_blocks=12, max_num_batched_tokens=64)
    tight = _run(tight_engine, requests)
    assert tight_engine.stats().num_preemptions > 0
    for got in (split, tight):
        for rid in requests:
            assert [o.token_ids for o in got[rid].outputs] == [o.token_ids for o in roomy[rid].outputs], rid


def test_beams_preempted_after_landing_are_extended_and_forked_while_waiting(folder, monkeypatch):
    """A beam preempted after its candidates landed is still chosen from when its siblings land:
    it is extended while waiting, and a beam forked from it waits to be recomputed with it."""
    ids, params = _prompts(seed=4)[1], _beam_params(4, max_tokens=24)
    want = _run(make_engine(folder), {"beam": (ids, params)})["beam"].outputs
    eng = make_engine(folder, max_num_batched_tokens=3)  # the four beams land over two steps
    waiting_forks = []
    add = eng.scheduler.add
    monkeypatch.setattr(eng.scheduler, "add", lambda seq: (waiting_forks.append(seq), add(seq)))
    eng.add_request("beam", ids, params)
    final, preempting = [], 6  # a few times only: an adversary preempting always would starve it
    for _ in range(500):
        group = eng.beams.groups.get("beam")
        if preempting and group is not None and group.candidates and not group.ready:
            preempting -= 1
            for beam in group.beams:  # preempt every beam that has landed, as a full pool would
                if beam.seq.seq_id in group.candidates and beam.seq in eng.scheduler.running:
                    eng.scheduler.running.remove(beam.seq)
                    eng.scheduler._preempt(beam.seq)
        final = eng.step()
        if final:
            break
    assert any(s.num_output_tokens for s in waiting_forks), "no beam forked from a preempted parent"
    assert [o.token_ids for o in final[0].outputs] == [o.token_ids for o in want]
    assert eng.kv.pool.num_used == 0 and not eng.has_unfinished_requests()


def test_llm_beam_search_returns_every_beam_with_text(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), profile="cpu", max_kv_blocks=64)
    outs = llm.beam_search(["Hello there", [3, 4, 5]], beam_width=3, max_tokens=6, ignore_eos=True)
    tok = llm.get_tokenizer()
    for out in outs:
        assert len(out.outputs) == 3 and out.finished
        assert len({tuple(o.token_ids) for o in out.outputs}) == 3
        assert all(o.text == tok.decode(o.token_ids, skip_special_tokens=True) for o in out.outputs)
        assert [o.score for o in out.outputs] == sorted((o.score for o in out.outputs), reverse=True)
    stats = llm.stats()
    assert stats.blocks_used == 0 and stats.generation_tokens_total > 0


def test_abort_mid_search_frees_every_beam(engine):
    engine.add_request("gone", list(range(1, 60)), _beam_params(4, max_tokens=40))
    for _ in range(4):
        engine.step()
    assert len(engine.requests["gone"].sequences) == 4 and engine.kv.pool.num_used > 0
    out = engine.abort_request("gone")
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort"] * 4
    assert all(len(o.token_ids) == 4 for o in out.outputs)  # one per step
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished_requests() and not engine.beams.groups


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beam_width=0), "beam_width"),
        (dict(beam_width=2, n=3), "n \\(3\\) must not exceed beam_width"),
        (dict(beam_width=2, temperature=0.7), "temperature must be 0 or 1"),
        (dict(beam_width=2, top_p=0.9), "top_p is not supported with beam search"),
        (dict(beam_width=2, top_k=5), "top_k is not supported"),
        (dict(beam_width=2, stop=["x"]), "stop is not supported"),
        (dict(beam_width=2, logprobs=1), "logprobs is not supported"),
        (dict(beam_width=2, repetition_penalty=1.2), "repetition_penalty is not supported"),
        (dict(beam_width=2, early_stopping="sometimes"), "early_stopping"),
        (dict(beam_width=2, length_penalty=float("nan")), "length_penalty"),
        (dict(length_penalty=2.0), "set beam_width > 1"),
    ],
)
def test_bad_beam_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_temperature_one_or_zero_both_mean_the_models_own_scores():
    assert SamplingParams(beam_width=2).temperature == SamplingParams(beam_width=2, temperature=0.0).temperature == 0.0


@pytest.mark.parametrize(
    "overrides, params, match",
    [
        (dict(max_num_seqs=2), _beam_params(4), "max_num_seqs"),
        (dict(num_kv_blocks=8), _beam_params(4, max_tokens=40), "lower beam_width or max_tokens"),
    ],
)
def test_beam_requests_the_engine_cannot_run_are_refused(folder, overrides, params, match):
    eng = make_engine(folder, **overrides)
    with pytest.raises(RequestError, match=match):
        eng.add_request("bad", list(range(1, 30)), params)
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_used == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_on_gpu(folder, backend):
    """On CUDA the beams' steps run beside overlapped ones, in the decode graphs (triton), with
    copy-on-write block copies on the device; the answers are still transformers' (fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    model.generation_config.eos_token_id = None
    eng = make_engine(folder, device=torch.device("cuda"), backend=backend, overlap_steps=True, cuda_graphs=True)
    prompts = _prompts(seed=4)
    requests, expected = {}, {}
    for i, ids in enumerate(prompts):
        t = torch.tensor([ids], device="cuda")
        opts = dict(do_sample=False, num_beams=4, num_return_sequences=4, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                    return_dict_in_generate=True)
        first = model.generate(t, attention_mask=torch.ones_like(t), **opts)
        eos = first.sequences[0, len(ids) + 3].item()
        out = model.generate(t, attention_mask=torch.ones_like(t), eos_token_id=eos, **opts)
        lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
        expected[str(i)] = [out.sequences[j, len(ids) : len(ids) + n].tolist() for j, n in enumerate(lengths)]
        requests[str(i)] = (ids, _beam_params(4, eos))
    requests["plain"] = (prompts[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    done = _run(eng, requests)
    for rid, want in expected.items():
        assert [o.token_ids for o in done[rid].outputs] == want, rid

"""Engine behaviour on a tiny random model: sampling, stops, n>1 sharing, refusals, aborts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_engine

from edgepaged import LLM, OutputKind, RequestError, SamplingParams
from edgepaged.detokenizer import IncrementalDetokenizer
from edgepaged.sampling import Sampler, SamplingRow, make_generator


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def _generate(engine, prompt, params, rid="r"):
    engine.add_request(rid, prompt, params)
    return engine.run_to_completion([rid])[rid]


def test_seeded_sampling_is_reproducible_and_seed_sensitive(engine):
    params = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=24, ignore_eos=True)
    a = _generate(engine, [5, 6, 7], SamplingParams(seed=1, **params), "a").outputs[0].token_ids
    b = _generate(engine, [5, 6, 7], SamplingParams(seed=1, **params), "b").outputs[0].token_ids
    c = _generate(engine, [5, 6, 7], SamplingParams(seed=2, **params), "c").outputs[0].token_ids
    assert a == b
    assert a != c


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    params = SamplingParams(seed=7, temperature=0.8, max_tokens=40, ignore_eos=True)
    prompts = [[i + 1] * (20 + 7 * i) for i in range(6)]
    roomy = make_engine(tiny_model_dir)
    tight = make_engine(tiny_model_dir, num_kv_blocks=12)
    results = []
    for eng in (roomy, tight):
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        final = eng.run_to_completion([str(i) for i in range(len(prompts))])
        results.append([final[str(i)].outputs[0].token_ids for i in range(len(prompts))])
    assert tight.stats().num_preemptions > 0
    assert results[0] == results[1]


def test_sampler_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100)
    greedy = logits.argmax(-1).tolist()
    gen = lambda i: make_generator(3, i, torch.device("cpu"))
    rows = [SamplingRow(SamplingParams(temperature=1.5, top_k=1), gen(0)),
            SamplingRow(SamplingParams(temperature=1.5, top_p=1e-6), gen(1)),
            SamplingRow(SamplingParams(temperature=0.0), None),
            SamplingRow(SamplingParams(temperature=1.0, top_k=1), None)]
    assert Sampler()(logits, rows).tolist() == greedy


def test_greedy_rows_take_the_first_of_tied_maxima_as_torch_does():
    """The CPU sampler's argmax runs through numpy; ties and a NaN pick what torch's would."""
    logits = torch.randn(6, 300)
    logits[1, [7, 120, 299]] = 50.0  # a three-way tie
    logits[2] = 0.0  # all tied
    logits[3, 40] = float("nan")
    rows = [SamplingRow(SamplingParams(temperature=0.0), None)] * 6
    got = Sampler()(logits, rows)
    assert got.dtype == torch.int64
    assert got.tolist() == logits.argmax(-1).tolist()
    assert got.tolist()[1:4] == [7, 0, 40]


def test_sampler_top_k_restricts_support():
    logits = torch.randn(1, 50)
    allowed = set(logits[0].topk(5).indices.tolist())
    drawn = {Sampler()(logits, [SamplingRow(SamplingParams(temperature=5.0, top_k=5))])[0].item() for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1


def test_sampler_matches_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    rows = [SamplingRow(SamplingParams(temperature=1.0), make_generator(11, 0, torch.device("cpu")))]
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[Sampler()(probs.log().unsqueeze(0), rows)[0].item()] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.04)


def test_n4_shares_prompt_blocks(engine):
    """n=4 samples of one prompt hold the prompt's full blocks once (copy-on-write)."""
    prompt = list(range(100, 140))  # 40 tokens: 2 full blocks + 8 in a partial block
    engine.add_request("n4", prompt, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=3, ignore_eos=True))
    engine.step()  # prefill + fork: all four share every prompt block
    assert engine.kv.pool.num_used == 3
    ids = [engine.kv.block_ids(s.seq_id) for s in engine.requests["n4"].sequences]
    assert len(ids) == 4 and all(t == ids[0] for t in ids)
    engine.step()  # first decode: three samples copy the partial block, the last writes in place
    ids = [engine.kv.block_ids(s.seq_id) for s in engine.requests["n4"].sequences]
    assert all(t[:2] == ids[0][:2] for t in ids), "full prompt blocks stay shared"
    assert len({t[2] for t in ids}) == 4
    assert engine.kv.pool.num_used == 2 + 4
    out = engine.run_to_completion(["n4"])["n4"]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 3 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert engine.kv.pool.num_used == 0


def test_stop_strings_and_stop_tokens(engine):
    base = _generate(engine, "Hello there", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), "base")
    text = base.outputs[0].text
    ids = base.outputs[0].token_ids
    assert len(text) > 6
    stop = text[3:6]
    out = _generate(engine, "Hello there", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]), "s")
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == text[: text.index(stop)]
    out = _generate(engine, "Hello there", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[ids[4]]), "t")
    assert out.outputs[0].token_ids == ids[: ids.index(ids[4]) + 1]
    assert out.outputs[0].finish_reason == "stop"
    out = _generate(engine, "Hello there", SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), "l")
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == ids[:7]


def test_streamed_text_is_append_only(engine):
    engine.add_request("stream", "Tell me", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=["zzzz"]))
    seen = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            assert text.startswith(seen)
            seen = text
    assert seen == engine.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_incremental_detokenizer_handles_multibyte_utf8(default_model_dir):
    from edgepaged.models.loader import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    text = "naïve café 日本語 🙂 Ελληνικά — done"
    ids = tok(text, add_special_tokens=False).input_ids
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [det.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + det.flush() == text


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", SamplingParams(), "empty"),
        ([], SamplingParams(), "empty"),
        ([1] * 2048, SamplingParams(), "context holds 2048"),
        ([10**6], SamplingParams(), "token ids"),
        ([1] * 100, SamplingParams(max_tokens=2000), "KV blocks"),
    ],
)
def test_requests_that_cannot_be_served_are_refused(tiny_model_dir, prompt, params, match):
    eng = make_engine(tiny_model_dir, num_kv_blocks=64)
    with pytest.raises(RequestError, match=match):
        eng.add_request("bad", prompt, params)
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_used == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(n=0), "n must"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_abort_frees_blocks_at_once(engine):
    engine.add_request("gone", list(range(1, 200)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.pool.num_used > 0
    out = engine.abort_request("gone")
    assert out.outputs[0].finish_reason == "abort" and out.finished
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished_requests()


def test_llm_api_and_stats(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), profile="cpu", max_kv_blocks=64)
    outs = llm.generate(["a b c", [3, 4, 5]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5]
    assert isinstance(outs[0].outputs[0].text, str) and outs[1].prompt_token_ids == [3, 4, 5]
    stats = llm.stats()
    assert stats.num_blocks == 64 and stats.blocks_used == 0
    assert stats.blocks_used + stats.blocks_free + stats.blocks_cached == 64
    assert llm.llm_engine.memory_plan.num_blocks == 64
    with pytest.raises(RequestError):
        llm.generate(["fine", ""])
    assert not llm.llm_engine.has_unfinished_requests()


def test_pin_prefix_survives_lru_pressure(tiny_model_dir):
    eng = make_engine(tiny_model_dir, num_kv_blocks=16)
    hot = list(range(1000, 1064))  # 4 full blocks
    assert eng.pin_prefix(hot) == 4
    for i in range(6):  # unrelated traffic that would otherwise evict the hot prefix
        _generate(eng, [2000 + i] * 80, SamplingParams(max_tokens=4, ignore_eos=True), f"x{i}")
    before = eng.kv.prefix_hit_tokens
    _generate(eng, hot + [7, 8], SamplingParams(max_tokens=2, ignore_eos=True), "hot")
    assert eng.kv.prefix_hit_tokens - before == 64
    eng.unpin_all()
    assert eng.kv.pool.num_used == 0


def test_abort_before_fork_finishes_an_n_request(engine):
    engine.add_request("n3", list(range(1, 300)), SamplingParams(n=3, max_tokens=5, ignore_eos=True))
    out = engine.abort_request("n3")
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort"]
    assert engine.kv.pool.num_used == 0


def test_penalties_reshape_logits_as_documented():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.9, 0.0]])
    greedy = lambda **kw: Sampler()(logits, [SamplingRow(SamplingParams(temperature=0.0, **kw), None, [1], [0, 0, 2])])
    assert greedy().item() == 0
    # repetition 2: token 0 (in the output) 2.0 -> 1.0, so token 3 (1.9, never seen) wins.
    assert greedy(repetition_penalty=2.0).item() == 3
    # frequency 0.3: token 0 seen twice, 2.0 - 0.6 = 1.4 < 1.9.
    assert greedy(frequency_penalty=0.3).item() == 3
    # presence 0.3: subtracted once, 1.7 < 1.9; presence 0.05 keeps token 0 ahead.
    assert greedy(presence_penalty=0.3).item() == 3
    assert greedy(presence_penalty=0.05).item() == 0
    # A negative logit of a seen token is pushed further down by repetition (multiplied).
    low = torch.tensor([[-0.5, -0.6]])
    rows = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.5), None, [], [0])]
    assert Sampler()(low, rows).item() == 1


def test_penalties_only_touch_their_own_rows():
    logits = torch.tensor([[2.0, 1.9], [2.0, 1.9]])
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=1.0), None, [], [0]),
        SamplingRow(SamplingParams(temperature=0.0), None),
    ]
    assert Sampler()(logits, rows).tolist() == [1, 0]


def test_repetition_penalty_breaks_a_greedy_loop(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    outs = {}
    for penalty in (1.0, 1.8):
        params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, repetition_penalty=penalty)
        outs[penalty] = _generate(eng, [5, 6, 7], params, f"rep{penalty}").outputs[0].token_ids
    repeats = {p: len(ids) - len(set(ids)) for p, ids in outs.items()}
    assert repeats[1.8] < repeats[1.0], repeats


@pytest.mark.parametrize("kwargs, match", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_bad_penalties(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logprobs_match_the_model_distribution(tiny_model_dir):
    """Each generated token's log-probability and its top alternatives equal a transformers
    forward pass over prompt + output; with sampling they are still the model's own (raw)."""
    from transformers import AutoModelForCausalLM

    eng = make_engine(tiny_model_dir)
    prompt = [5, 6, 7, 8]
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=6, ignore_eos=True, logprobs=3, repetition_penalty=1.2)
    out = _generate(eng, prompt, params, "lp").outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry.token_id == token and entry.token == eng.tokenizer.decode([token])
        assert abs(entry.logprob - row[token].item()) < 1e-4
        want = row.topk(3)
        assert [t for t, _, _ in entry.top] == want.indices.tolist()
        assert all(abs(lp - w) < 1e-4 for (_, _, lp), w in zip(entry.top, want.values.tolist()))
    plain = _generate(eng, prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), "nolp").outputs[0]
    assert plain.logprobs is None


def test_logprobs_zero_gives_only_the_chosen_token(engine):
    out = _generate(engine, [9, 10], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0), "lp0")
    entries = out.outputs[0].logprobs
    assert len(entries) == 4 and all(e.top == [] and e.logprob <= 0 for e in entries)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_a_failure_processing_one_request_ends_only_that_request(tiny_model_dir):
    """Whatever one request's output processing raises ends that request ("error") and leaves
    the others in the same steps running to their full length."""
    engine = make_engine(tiny_model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for rid in ("a", "bad", "c"):
        engine.add_request(rid, [5, 6, 7, 8], params)
    process = engine.outputs.process_token

    def failing(seq, *args):
        if seq.request.request_id == "bad" and seq.num_output_tokens == 3:
            raise ValueError("simulated failure")
        return process(seq, *args)

    engine.outputs.process_token = failing
    final = engine.run_to_completion(["a", "bad", "c"])
    assert final["bad"].outputs[0].finish_reason == "error"
    assert len(final["bad"].outputs[0].token_ids) == 3
    for rid in ("a", "c"):
        assert final[rid].outputs[0].finish_reason == "length" and len(final[rid].outputs[0].token_ids) == 8
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished_requests()


def _run_collecting(engine, rid, prompt, params):
    engine.add_request(rid, prompt, params)
    seen = []
    while engine.has_unfinished_requests():
        seen += [out for out in engine.step() if out.request_id == rid]
    return seen


def test_output_kinds_carry_the_same_result(engine):
    """DELTA pieces add up to the cumulative text, tokens and log-probabilities; FINAL_ONLY hands
    out exactly one output, the same as the cumulative one's last."""
    base = dict(temperature=0.9, seed=5, max_tokens=20, ignore_eos=True, logprobs=2, n=2, stop=["zz"])
    cumulative = _run_collecting(engine, "cum", "Hello there", SamplingParams(**base))
    delta = _run_collecting(engine, "delta", "Hello there", SamplingParams(output_kind=OutputKind.DELTA, **base))
    final = _run_collecting(engine, "final", "Hello there", SamplingParams(output_kind=OutputKind.FINAL_ONLY, **base))
    last = cumulative[-1]
    assert len(cumulative) > 1 and len(final) == 1 and final[0].finished
    for i, want in enumerate(last.outputs):
        pieces = [o.outputs[i] for o in delta]
        assert "".join(p.text for p in pieces) == want.text
        assert [t for p in pieces for t in p.token_ids] == want.token_ids
        assert [lp.token_id for p in pieces for lp in p.logprobs] == want.token_ids
        assert final[0].outputs[i].text == want.text and final[0].outputs[i].token_ids == want.token_ids
    assert sum(len(o.outputs[0].token_ids) for o in delta) == len(last.outputs[0].token_ids)


def test_llm_generate_builds_no_output_before_the_end(tiny_model_dir, monkeypatch):
    llm = LLM(model=str(tiny_model_dir), profile="cpu", max_kv_blocks=64)
    made = []
    original = llm.llm_engine.outputs.output
    monkeypatch.setattr(llm.llm_engine.outputs, "output", lambda r: made.append(r.request_id) or original(r))
    outs = llm.generate(["a b c", "d e"], SamplingParams(max_tokens=12, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]
    assert sorted(made) == sorted(o.request_id for o in outs)


def test_merged_deltas_equal_the_cumulative_output(engine):
    """A consumer reading several DELTA outputs at once (merge_deltas) gets what CUMULATIVE gives."""
    from edgepaged.outputs import merge_deltas

    base = dict(temperature=0.9, seed=9, max_tokens=16, ignore_eos=True, logprobs=1, n=2)
    last = _run_collecting(engine, "cum2", "Once", SamplingParams(**base))[-1]
    deltas = _run_collecting(engine, "delta2", "Once", SamplingParams(output_kind=OutputKind.DELTA, **base))
    merged = deltas[0]
    for out in deltas[1:]:
        merged = merge_deltas(merged, out)
    assert merged.finished
    for got, want in zip(merged.outputs, last.outputs):
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert [lp.token_id for lp in got.logprobs] == want.token_ids

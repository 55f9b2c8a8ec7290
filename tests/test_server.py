"""The OpenAI-compatible server, tested live: uvicorn on a loopback port, the official clients.

Each server runs the real engine on the tiny random-weight model in a background thread, so
what is checked is what a client sees: wire format, streaming, errors, backpressure, aborts.
Greedy answers are compared with the offline engine on the same folder, token for token.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from edgepaged.engine import LLMEngine
from edgepaged.profiles import load_profile
from edgepaged.sampling import SamplingParams
from edgepaged.server.app import ServerConfig, create_app
from edgepaged.server.async_engine import AdmissionLimits, AsyncEngine

MODEL = "tiny"
KEY = "test-key"
KV_BLOCKS = 512
MAX_BODY = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class LiveServer:
    url: str
    engine: LLMEngine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples by name (histograms by _count/_sum), request outcomes as requests_<outcome>."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "edgepaged_requests_total":
                    out[f"requests_{sample.labels['outcome']}"] = sample.value
                elif not sample.labels:
                    out[sample.name] = sample.value
        return out

    def wait_until(self, condition, timeout: float = 10.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if condition(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


@contextmanager
def live_server(engine: LLMEngine, limits: AdmissionLimits, **config) -> Iterator[LiveServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(AsyncEngine(engine, limits), ServerConfig(served_model_names=[MODEL], **config))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def live(tiny_model_dir) -> Iterator[LiveServer]:
    engine = LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=KV_BLOCKS)
    with live_server(engine, AdmissionLimits(1024, 1 << 20), api_key=KEY, max_body_bytes=MAX_BODY) as server:
        yield server


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=KV_BLOCKS)


def offline_greedy(engine: LLMEngine, prompts: list[str | list[int]], max_tokens: int, **params) -> list[str]:
    ids = []
    for i, prompt in enumerate(prompts):
        rid = f"ref-{time.monotonic_ns()}-{i}"
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, **params))
        ids.append(rid)
    done = engine.run_to_completion(ids)
    return [done[rid].outputs[0].text for rid in ids]


def chat_ids(engine: LLMEngine, content: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def sse_events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            yield line.removeprefix("data: ")


# ---- the API through the official client ---------------------------------------------------


def test_models_health_and_ready(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.url}/ready").status_code == 200


def test_completion_matches_offline_greedy(live, offline):
    prompt = "The capital of France is"
    want = offline_greedy(offline, [prompt], 12)[0]
    got = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == len(offline.encode(prompt))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.usage.completion_tokens in range(1, 13)


def test_penalties_reach_the_sampler(live, offline):
    """OpenAI's presence/frequency penalties and vLLM's repetition_penalty give the offline
    engine's answer with the same penalties, which differs from the unpenalised one."""
    prompt = "The capital of France is"
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.5)
    want = offline_greedy(offline, [prompt], 24, ignore_eos=True, **penalties)[0]
    plain = offline_greedy(offline, [prompt], 24, ignore_eos=True)[0]
    assert want != plain
    got = live.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
        presence_penalty=0.5, frequency_penalty=0.5, extra_body={"repetition_penalty": 1.5, "ignore_eos": True},
    )
    assert got.choices[0].text == want


def test_logprobs_in_both_formats_match_the_engine(live, offline):
    """Completions give the legacy parallel lists, chat gives content entries with bytes; both
    carry the offline engine's values for the same greedy tokens."""
    prompt = "The capital of France is"
    offline.add_request("lp-ref", prompt, SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, ignore_eos=True))
    want = offline.run_to_completion(["lp-ref"])["lp-ref"].outputs[0].logprobs
    got = live.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    ).choices[0]
    lp = got.logprobs
    assert lp.tokens == [e.token for e in want] and "".join(lp.tokens) == got.text
    assert all(abs(a - e.logprob) < 1e-5 for a, e in zip(lp.token_logprobs, want))
    assert [list(t) for t in lp.top_logprobs] == [[text for _, text, _ in e.top] for e in want]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    chat = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3,
    ).choices[0]
    entries = chat.logprobs.content
    assert len(entries) == 4 and "".join(e.token for e in entries).startswith(chat.message.content)
    for e in entries:
        assert e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy: the chosen token is the likeliest
    plain = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_streamed_and_not_agree_with_offline(live, offline):
    messages = [{"role": "user", "content": "Name a colour."}]
    want = offline_greedy(offline, [chat_ids(offline, "Name a colour.")], 10)[0]
    client = live.client()
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streaming_completion_is_sse_ending_with_done(live, offline):
    prompt = "Once upon a time"
    want = offline_greedy(offline, [prompt], 9)[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 9, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_n_seed_and_stop(live, offline):
    client = live.client()
    sampled = [
        client.completions.create(
            model=MODEL,
            prompt="Pick a word:",
            max_tokens=8,
            n=2,
            seed=7,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )
        for _ in range(2)
    ]
    assert [c.index for c in sampled[0].choices] == [0, 1]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # same seed, same draw
    assert sampled[0].usage.completion_tokens == 16

    prompt = "Counting: one two three"
    text = offline_greedy(offline, [prompt], 16, ignore_eos=True)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    got = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == text[: text.find(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_beam_search_matches_offline(live, offline):
    """`beam_width` on both endpoints: the `n` best of the offline engine's beams, best first."""
    prompt = "The capital of France is"
    params = SamplingParams(n=2, beam_width=3, max_tokens=8, ignore_eos=True, length_penalty=0.5)
    offline.add_request("beam-ref", prompt, params)
    want = offline.run_to_completion(["beam-ref"])["beam-ref"].outputs
    extra = {"beam_width": 3, "length_penalty": 0.5, "ignore_eos": True}
    got = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, extra_body=extra)
    assert [c.text for c in got.choices] == [o.text for o in want]
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    chat = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, extra_body={"beam_width": 2}
    )
    assert len(chat.choices) == 1 and chat.choices[0].finish_reason in ("stop", "length")


def test_64_concurrent_streams_match_offline(live, offline):
    prompts = [f"Request {i}: write about the number {i * 7}" for i in range(64)]
    want = offline_greedy(offline, prompts, 8)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def all_of_them() -> list[str]:
        async with live.async_client() as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout=180)

    assert asyncio.run(all_of_them()) == want
    m = live.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
    assert m["edgepaged_kv_blocks_used"] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "waiting-for-whole-answer"])
def test_client_disconnect_aborts_and_frees_blocks(live, stream):
    idle = live.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
    assert idle["edgepaged_kv_blocks_used"] == 0
    body = {
        "model": MODEL,
        "prompt": "Tell me a very long story",
        "max_tokens": 1500,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }
    if stream:
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            events = sse_events(r)
            for _ in range(3):
                next(events)
            busy = live.metrics()
    else:  # a raw socket, so the test decides when the client hangs up
        host, port = live.url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(head.encode() + payload)
            busy = live.wait_until(
                lambda m: m["edgepaged_generation_tokens_total"] > idle["edgepaged_generation_tokens_total"] + 3
            )
    assert busy["edgepaged_kv_blocks_used"] > 0 and busy["edgepaged_requests_running"] == 1
    after = live.wait_until(lambda m: m["edgepaged_kv_blocks_used"] == 0 and m["edgepaged_requests_running"] == 0)
    assert after["edgepaged_kv_blocks_used"] == 0 and after["edgepaged_requests_running"] == 0
    generated = after["edgepaged_generation_tokens_total"] - idle["edgepaged_generation_tokens_total"]
    assert generated < 1500, "the request ran to the end instead of being aborted"
    assert after["requests_abort"] == idle.get("requests_abort", 0) + 1


def test_metrics_cover_engine_and_latencies(live):
    before = live.metrics()
    client = live.client()
    for i in range(3):
        client.completions.create(
            model=MODEL, prompt=f"metrics {i}", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
    m = live.metrics()
    assert m["edgepaged_kv_blocks_total"] == KV_BLOCKS
    assert m["edgepaged_kv_blocks_used"] + m["edgepaged_kv_blocks_free"] + m["edgepaged_kv_blocks_cached"] == KV_BLOCKS
    assert m["edgepaged_time_to_first_token_seconds_count"] - before["edgepaged_time_to_first_token_seconds_count"] == 3
    assert m["edgepaged_inter_token_latency_seconds_count"] - before["edgepaged_inter_token_latency_seconds_count"] == 9
    assert m["edgepaged_e2e_request_latency_seconds_count"] - before["edgepaged_e2e_request_latency_seconds_count"] == 3
    assert m["edgepaged_generation_tokens_total"] - before["edgepaged_generation_tokens_total"] == 12
    assert m["edgepaged_prompt_tokens_total"] > before["edgepaged_prompt_tokens_total"]
    assert 0.0 <= m["edgepaged_prefix_cache_hit_ratio"] <= 1.0
    for name in ("edgepaged_requests_waiting", "edgepaged_preemptions_total", "edgepaged_engine_healthy"):
        assert name in m


# ---- bad input -----------------------------------------------------------------------------

_LONG_PROMPT = list(range(100, 100 + 9000))  # longer than the cpu profile's context (8192)

BAD_REQUESTS = [
    # (name, path, raw body, headers, status, message fragment)
    ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', AUTH, 400, "JSON"),
    ("not an object", "/v1/completions", b"[1, 2]", AUTH, 400, "object"),
    ("invalid utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', AUTH, 400, "UTF-8"),
    (
        "max_tokens as string",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": "10"},
        AUTH,
        400,
        "max_tokens",
    ),
    (
        "negative max_tokens",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": -5},
        AUTH,
        400,
        "max_tokens",
    ),
    (
        "temperature as word",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "temperature": "hot"},
        AUTH,
        400,
        "temperature",
    ),
    ("top_p zero", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, AUTH, 400, "top_p"),
    ("n zero", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, AUTH, 400, "n"),
    ("top_k below off", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -2}, AUTH, 400, "top_k"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, AUTH, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, AUTH, 400, "empty"),
    ("batched prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, AUTH, 400, "one prompt"),
    ("token out of vocab", "/v1/completions", {"model": MODEL, "prompt": [10**9]}, AUTH, 400, "token ids"),
    ("prompt longer than context", "/v1/completions", {"model": MODEL, "prompt": _LONG_PROMPT}, AUTH, 400, "context"),
    ("logprobs while streaming", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2, "stream": True},
     AUTH, 400, "stream"),
    ("beam search while streaming", "/v1/completions",
     {"model": MODEL, "prompt": "x", "beam_width": 2, "stream": True}, AUTH, 400, "'stream' is not supported with 'beam_width'"),
    ("chat beam search while streaming", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "beam_width": 2, "stream": True}, AUTH, 400,
     "beam_width"),
    ("n above beam_width", "/v1/completions", {"model": MODEL, "prompt": "x", "beam_width": 2, "n": 3}, AUTH, 400,
     "must not exceed beam_width"),
    ("sampled beam search", "/v1/completions", {"model": MODEL, "prompt": "x", "beam_width": 2, "temperature": 0.7},
     AUTH, 400, "temperature must be 0 or 1"),
    ("speculative out of range", "/v1/completions", {"model": MODEL, "prompt": "x", "speculative": 16}, AUTH, 400,
     "speculative"),
    ("speculative beam search", "/v1/completions", {"model": MODEL, "prompt": "x", "beam_width": 2, "speculative": 4},
     AUTH, 400, "speculative decoding is not supported with beam search"),
    ("speculative logprobs", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 1, "speculative": 4},
     AUTH, 400, "logprobs are not supported with speculative decoding"),
    ("logprobs out of range", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, AUTH, 400, "logprobs"),
    ("top_logprobs alone", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, AUTH, 400, "top_logprobs"),
    ("logit_bias", "/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1}}, AUTH, 400, "logit_bias"),
    ("presence penalty range", "/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 3}, AUTH, 400,
     "presence_penalty"),
    ("repetition penalty zero", "/v1/completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, AUTH, 400,
     "repetition_penalty"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, AUTH, 404, "gpt-9"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, AUTH, 400, "messages"),
    (
        "bad role",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        AUTH,
        400,
        "role",
    ),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, AUTH, 400, "messages"),
    ("oversized body", "/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_BODY + 10)}, AUTH, 413, "exceeds"),
    ("missing api key", "/v1/completions", {"model": MODEL, "prompt": "x"}, {}, 401, "API key"),
    (
        "wrong api key",
        "/v1/completions",
        {"model": MODEL, "prompt": "x"},
        {"Authorization": "Bearer nope"},
        401,
        "API key",
    ),
    ("wrong scheme", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401, "API key"),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "x"}, AUTH, 404, "Not Found"),
    ("wrong method", "/v1/completions", None, AUTH, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("name,path,body,headers,status,fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_clean_4xx(live, name, path, body, headers, status, fragment):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        if body is None:
            r = http.get(path, headers=headers)
        elif isinstance(body, bytes):
            r = http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        else:
            r = http.post(path, json=body, headers=headers)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert fragment in error["message"]
        assert "Traceback" not in r.text and 'File "' not in r.text
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "still up?", "max_tokens": 2}, headers=AUTH)
        assert ok.status_code == 200, "the server stopped serving after a bad request"


def test_chunked_oversized_body_is_refused(live):
    def chunks():
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"x" * 1024

    r = httpx.post(f"{live.url}/v1/completions", content=chunks(), headers=AUTH, timeout=30)
    assert r.status_code == 413


# ---- backpressure --------------------------------------------------------------------------


def test_overload_gets_429_and_every_accepted_request_completes(tiny_model_dir):
    # Two running sequences at a time and two waiting: a burst of 40 must overflow.
    cpu = load_profile("cpu")
    profile = cpu.model_copy(update={"scheduler": cpu.scheduler.model_copy(update={"max_num_seqs": 2})})
    engine = LLMEngine.from_model(str(tiny_model_dir), profile, max_kv_blocks=128)
    body = {"model": MODEL, "prompt": "load", "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await asyncio.wait_for(
                asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(40))), 180
            )

    with live_server(engine, AdmissionLimits(max_waiting_requests=2, max_waiting_tokens=1 << 20)) as server:
        responses = asyncio.run(burst(server.url))
        rejected = [r for r in responses if r.status_code == 429]
        accepted = [r for r in responses if r.status_code == 200]
        assert len(rejected) + len(accepted) == 40
        assert rejected and accepted
        for r in rejected:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        for r in accepted:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 24
        m = server.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
        assert m["requests_rejected"] == len(rejected)
        assert m["edgepaged_kv_blocks_used"] == 0 and m["edgepaged_server_queue_requests"] == 0
        after = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert after.status_code == 200, "the queue did not drain back to accepting"


def test_a_full_queue_refuses_before_reading_the_body(tiny_model_dir):
    """The admission gate: while the queue is full, a generation request gets its 429 (with
    Retry-After) from its headers alone: one whose body never arrives, or is not even JSON, is
    refused all the same; one without the API key still gets its 401. The request that holds
    the queue then completes in full."""
    engine = LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=64)
    held, step = threading.Event(), engine.step

    def held_step():
        held.wait()  # the first request is admitted but makes no token: it keeps the queue full
        return step()

    engine.step = held_step
    body = {"model": MODEL, "prompt": "hold the queue", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    config = dict(api_key=KEY, body_timeout_s=300.0)
    with live_server(engine, AdmissionLimits(max_waiting_requests=1, max_waiting_tokens=1 << 20), **config) as server:
        first: list[httpx.Response] = []
        holder = threading.Thread(
            target=lambda: first.append(httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120))
        )
        holder.start()
        try:
            assert server.wait_until(lambda m: m["edgepaged_server_queue_requests"] == 1)["edgepaged_server_queue_requests"] == 1

            host, port = server.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=60) as conn:  # headers only, no body ever
                conn.sendall(
                    f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n".encode()
                )
                head = conn.recv(65536)  # answered although the body (300 s allowed) never came
            assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nretry-after: " in head.lower()

            not_json = httpx.post(
                f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            assert not_json.status_code == 429 and int(not_json.headers["retry-after"]) >= 1
            error = not_json.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
            assert "1 requests" in error["message"] and not_json.headers["x-request-id"]

            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers=AUTH, timeout=30).status_code == 429
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 401
            assert httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).status_code == 200
            assert server.metrics()["requests_rejected"] == 3
        finally:
            held.set()
            holder.join(timeout=120)
        assert first[0].status_code == 200, first[0].text
        assert first[0].json()["usage"]["completion_tokens"] == 8
        assert httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).status_code == 200


# ---- failure -------------------------------------------------------------------------------


def test_engine_failure_fails_requests_cleanly_and_reports_unhealthy(tiny_model_dir):
    engine = LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=64)

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step  # the fault: the next forward pass dies
    with live_server(engine, AdmissionLimits(8, 1 << 16)) as server:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
        first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert first.status_code == 503
        assert first.json()["error"]["code"] == "service_unavailable" and "RuntimeError" in first.text
        assert "device lost" not in first.text and "Traceback" not in first.text
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.get(f"{server.url}/ready").status_code == 503
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 503
        assert server.metrics()["edgepaged_engine_healthy"] == 0

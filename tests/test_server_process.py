"""Issue 11, against a real `edgepaged serve` process on the tiny random-weight model.

One bad request must never take the server down: each field that once crashed the engine loop
or ran unbounded gets its own 4xx while the process keeps serving; a bad top_k beside sampled
requests ends only itself; a 3 MB prompt is tokenized without stalling another client's stream;
429s come back at once; browsers' attacks on a local server (a foreign Host, a text/plain POST,
a cross-origin read) and slow-loris connections are refused; and a real engine fault fails
every request in flight with a final status and ends the process with status 1, for systemd
to restart it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_serve import burst  # raw-socket requests: the client's own overhead left out

MODEL = "tiny"
MAX_WAITING = 4
SERVE = "import typer; from edgepaged.cli.serve import serve; typer.run(serve)"
# The same command with an engine that faults at its next step once the trigger file exists.
FAULTY_SERVE = """
import os, typer
from edgepaged.cli.serve import serve
from edgepaged.engine import LLMEngine

trigger, step = os.environ["EDGEPAGED_TEST_FAULT"], LLMEngine.step

def step_or_fault(self):
    if os.path.exists(trigger):
        raise RuntimeError("device lost")
    return step(self)

LLMEngine.step = step_or_fault
typer.run(serve)
"""


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    url: str
    log: Path

    def post(self, path: str, body: object, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=60, **kw)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def spawn(tiny_model_dir, tmp_path_factory) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(*args: str, code: str = SERVE, env: dict[str, str] | None = None) -> ServeProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        cmd = [
            sys.executable, "-c", code, "--model", str(tiny_model_dir), "--served-model-name", MODEL,
            "--port", str(port), "--max-kv-blocks", "512", "--drain-timeout", "5", *args,
        ]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        procs.append(proc)
        server = ServeProcess(proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{server.output()}"
            assert time.monotonic() < deadline, f"serve was not ready:\n{server.output()}"
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def served(spawn) -> ServeProcess:
    return spawn(
        "--max-waiting-requests", str(MAX_WAITING), "--header-timeout", "1", "--log-level", "info",
        "--cors-origin", "https://app.example", "--allowed-host", "box.lan",
    )


def completion(prompt: str = "Hello", **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


BAD_REQUESTS = [
    # (name, path, body, status, fragments of the message)
    ("top_k past int64", "/v1/completions", completion(temperature=1, top_k=2**63), 400, ["top_k"]),
    ("top_k past int64 in chat", "/v1/chat/completions", chat(temperature=1, top_k=2**63), 400, ["top_k"]),
    ("top_k past the vocabulary", "/v1/completions", completion(temperature=1, top_k=49153), 400, ["49152"]),
    ("seed past 64 bits", "/v1/completions", completion(temperature=1, seed=2**64), 400, ["seed"]),
    ("max_tokens 10**12", "/v1/completions", completion(max_tokens=10**12), 400, ["max_tokens is 1000000000000", "the context of 2048 tokens leaves"]),
    ("max_tokens 10**30", "/v1/completions", completion(max_tokens=10**30), 400, ["max_tokens"]),
    ("max_completion_tokens 10**12", "/v1/chat/completions", chat(max_completion_tokens=10**12), 400,
     ["max_completion_tokens is 1000000000000", "2048"]),
    ("1 MiB stop string", "/v1/completions", completion(stop=["x" * 2**20]), 400, ["256 characters"]),
    ("17 stop strings", "/v1/completions", completion(stop=[f"s{i}" for i in range(17)]), 400, ["16 stop strings"]),
]


@pytest.mark.parametrize("name,path,body,status,fragments", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_each_bad_request_gets_its_4xx_and_the_server_serves_on(served, name, path, body, status, fragments):
    r = served.post(path, body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(f in message for f in fragments), message
    assert served.post("/v1/completions", completion(temperature=1)).status_code == 200
    assert served.proc.poll() is None


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_json_endpoints_need_a_json_content_type(served, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(f"{served.url}/v1/completions", content=json.dumps(completion()), headers=headers, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_bad_top_k_beside_sampled_requests_ends_only_itself(served):
    """The issue's crash: a top_k past int64 batched with sampled requests took the loop down."""
    good = completion("Tell me a story", max_tokens=24, temperature=1.0, ignore_eos=True)

    async def batch() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
            sampled = [http.post("/v1/completions", json=good) for _ in range(MAX_WAITING - 1)]
            bad = http.post("/v1/completions", json={**good, "top_k": 2**63})
            return await asyncio.gather(bad, *sampled)

    bad, *sampled = asyncio.run(batch())
    assert bad.status_code == 400 and "top_k" in bad.text
    for r in sampled:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 24 and r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["choices"][0]["text"]
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_a_3mb_prompt_does_not_stall_another_stream(served):
    gaps: list[float] = []
    huge_done = threading.Event()
    started = threading.Event()

    def stream() -> None:
        body = completion("Once upon a time", max_tokens=2000, temperature=0, ignore_eos=True, stream=True)
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=120) as r:
            last = None
            for line in r.iter_lines():
                now = time.perf_counter()
                if last is not None and not huge_done.is_set():
                    gaps.append(now - last)
                last = now
                started.set()
                if huge_done.is_set():
                    return

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert started.wait(60)
    time.sleep(0.2)
    before = len(gaps)
    start = time.perf_counter()
    huge = served.post("/v1/completions", completion("lorem ipsum dolor sit amet " * 116_000))  # ~3.1 MB
    took = time.perf_counter() - start
    huge_done.set()
    reader.join(timeout=60)
    assert huge.status_code == 400 and "context" in huge.text
    during = gaps[before:]
    assert during, "the stream sent nothing while the prompt was tokenized"
    assert max(during) < 0.5, f"a chunk waited {max(during):.2f} s while a {took:.1f} s prompt was tokenized"


def test_429s_come_back_at_once_with_retry_after(served):
    results = burst(served.url, completion("load", max_tokens=32, temperature=0, ignore_eos=True), 40)
    refused = [(t, head) for status, t, head in results if status == 429]
    accepted = [status for status, _, _ in results if status == 200]
    assert len(refused) + len(accepted) == 40 and accepted and refused
    assert all(b"\r\nretry-after: " in head.lower() for _, head in refused)
    latencies = sorted(t for t, _ in refused)
    assert statistics.median(latencies) < 0.05, f"429 p50 {statistics.median(latencies) * 1000:.0f} ms"
    assert latencies[-1] < 0.25, f"slowest 429 took {latencies[-1] * 1000:.0f} ms"


@pytest.mark.parametrize(
    "host,status",
    [
        ("attacker.example", 403),
        ("attacker.example:8000", 403),
        ("localhost:8000", 200),
        ("127.0.0.1", 200),
        ("[::1]:8000", 200),
        ("box.lan:8000", 200),  # named with --allowed-host
    ],
)
def test_host_header_must_name_this_server(served, host, status):
    r = httpx.get(f"{served.url}/v1/models", headers={"Host": host}, timeout=10)
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "host_not_allowed"


def test_cors_answers_only_listed_origins(served):
    def preflight(origin: str) -> httpx.Response:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        return httpx.options(f"{served.url}/v1/completions", headers=headers, timeout=10)

    assert preflight("https://app.example").headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers
    r = httpx.get(f"{served.url}/v1/models", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers


def test_stalled_headers_are_cut_off(served):
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        start = time.monotonic()
        assert conn.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 5


def test_request_log_has_id_status_duration_and_no_prompt(served):
    r = served.post("/v1/completions", completion("SECRET-PROMPT-TEXT"))
    request_id = r.headers["x-request-id"]
    assert r.json()["id"] == f"cmpl-{request_id}"
    deadline = time.monotonic() + 5
    while request_id not in served.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in served.output().splitlines() if request_id in x)
    assert "POST /v1/completions 200" in line and line.endswith(" ms")
    assert "SECRET-PROMPT-TEXT" not in served.output()


def test_engine_fault_fails_every_request_and_exits_1(spawn, tmp_path):
    trigger = tmp_path / "fault"
    server = spawn("--max-waiting-requests", "16", code=FAULTY_SERVE, env={"EDGEPAGED_TEST_FAULT": str(trigger)})
    events: list[list[str]] = [[], []]

    def stream(into: list[str]) -> None:
        body = completion("stream", max_tokens=2000, ignore_eos=True, stream=True)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            into.extend(line.removeprefix("data: ") for line in r.iter_lines() if line)

    readers = [threading.Thread(target=stream, args=(e,), daemon=True) for e in events]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 60
    while not all(events):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    whole: dict = {}
    waiter = threading.Thread(
        target=lambda: whole.update(r=server.post("/v1/completions", completion(max_tokens=2000, ignore_eos=True))),
        daemon=True,
    )
    waiter.start()
    time.sleep(0.3)
    trigger.touch()
    for t in [*readers, waiter]:
        t.join(timeout=30)
    for e in events:
        assert e[-1] == "[DONE]"
        assert json.loads(e[-2])["error"]["code"] == "service_unavailable", e[-2]
    assert whole["r"].status_code == 503 and "RuntimeError" in whole["r"].text
    assert server.proc.wait(timeout=30) == 1
    assert "device lost" not in whole["r"].text

"""Load-test `edgepaged serve` against the engine alone: TTFT, inter-token latency, throughput.

The engine is driven in this process (no HTTP) and the same requests go through a server this
script starts (--model/--profile/--backend), level by level and side by side: each round runs
every concurrency level on both sides, engine then server in even rounds and server then engine
in odd ones, so load that drifts on a shared box falls on both sides alike. The engine runs in a
process of its own, as the server does, loaded once and idle while the server runs: driven from
this process (which also runs the HTTP client and its asyncio loop) its first levels paid
first-use costs and its later ones ran 3-7x slower than the server on the same box. The report gives each level's server/engine ratios, per
round and their median. A running server (--url) is measured alone. The server then takes a
burst of --burst requests at once to time its 429s. For a server it started, the report adds
the server's CPU time per streamed token (its event loop apart), read from /proc. At each level that many requests are kept in
flight until the level's request count or time limit is reached. Every request has a distinct
prompt (no free prefix hits) and a fixed output length (ignore_eos), so levels and the two sides
compare like with like.

Writes docs/benchmarks/serve-<card>-<date>.md and .json with the command line that made them.

    python scripts/bench_serve.py --profile cpu --max-tokens 32
    python scripts/bench_serve.py --profile cpu --concurrency 1,8 --rounds 3 --max-kv-blocks 1024
    python scripts/bench_serve.py --profile h100-80gb --backend triton
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --card jetson-orin-nano-8gb
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
_WORDS = "the small box answers questions about documents while the cache keeps every shared prefix warm".split()


@dataclass(slots=True)
class RequestResult:
    ok: bool
    status: int
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive streamed chunks
    e2e: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class LevelResult:
    side: str  # "engine" (in this process, no HTTP) or "server"
    concurrency: int
    requests: int
    ok: int
    rejected: int
    failed: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    mean_prompt_tokens: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    round: int = 0
    # CPU the server's event loop (its main thread) and the rest of its process (engine,
    # torch and tokenizer threads) spent per token streamed: the host work a token costs,
    # which a shared box's load leaves alone, unlike the latencies. A server this script
    # started only (read from /proc).
    loop_cpu_us_per_token: float | None = None
    rest_cpu_us_per_token: float | None = None


class ServerCpu:
    """CPU seconds of a local server process, its main thread apart (Linux /proc)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _seconds(self, stat: str) -> float:
        fields = Path(stat).read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def sample(self) -> tuple[float, float]:
        """(main thread, whole process)."""
        return self._seconds(f"/proc/{self.pid}/task/{self.pid}/stat"), self._seconds(f"/proc/{self.pid}/stat")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _dash(value: float | None) -> str:
    return "-" if value is None else str(value)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def make_prompt(i: int, words: int) -> str:
    return f"Request {i}: " + " ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(words))


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False, status=0)
    async with http.stream("POST", "/v1/completions", json=body) as r:
        result.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                result.completion_tokens = chunk["usage"]["completion_tokens"]
            if not any(c.get("text") for c in chunk.get("choices", [])):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.gaps.append(now - last)
            last = now
    result.e2e = time.perf_counter() - start
    result.ok = result.completion_tokens == max_tokens
    return result


async def run_level(
    url: str,
    model: str,
    concurrency: int,
    requests: int,
    prompt_words: int,
    max_tokens: int,
    time_limit: float,
    first_id: int,
) -> LevelResult:
    results: list[RequestResult] = []
    next_id = iter(range(first_id, first_id + requests))
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(http: httpx.AsyncClient) -> None:
        for i in next_id:
            if time.perf_counter() - start > time_limit:
                return
            results.append(await one_request(http, model, make_prompt(i, prompt_words), max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=time_limit + 60, limits=limits) as http:
        await asyncio.wait_for(asyncio.gather(*(worker(http) for _ in range(concurrency))), time_limit + 120)
    return summarise("server", concurrency, results, time.perf_counter() - start)


def run_engine_level(
    engine, concurrency: int, requests: int, prompt_words: int, max_tokens: int, time_limit: float, first_id: int
) -> LevelResult:
    """The same workload on the engine alone: `concurrency` requests in flight, gaps timed
    where the engine returns each request's new token."""
    from edgepaged.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = iter(range(first_id, first_id + requests))
    live: dict[str, tuple[RequestResult, float]] = {}  # request id -> (result, time of its last token)
    results: list[RequestResult] = []
    start = time.perf_counter()

    def add() -> None:
        i = next(pending, None)
        if i is None or time.perf_counter() - start > time_limit:
            return
        rid = f"bench-{i}"
        engine.add_request(rid, make_prompt(i, prompt_words), params)
        live[rid] = (RequestResult(ok=False, status=200), time.perf_counter())

    for _ in range(concurrency):
        add()
    while live:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            result, last = live[out.request_id]
            tokens = len(out.outputs[0].token_ids)
            new = tokens - result.completion_tokens
            if new > 0 and result.ttft is None:
                result.ttft, new = now - last, new - 1
            result.gaps += [(now - last) / new] * new if new > 0 else []
            result.completion_tokens = tokens
            live[out.request_id] = (result, now)
            if out.finished:
                result.prompt_tokens = len(out.prompt_token_ids)
                result.e2e = sum(result.gaps) + (result.ttft or 0.0)
                result.ok = tokens == max_tokens
                results.append(result)
                del live[out.request_id]
                add()
    return summarise("engine", concurrency, results, time.perf_counter() - start)


def summarise(side: str, concurrency: int, results: list[RequestResult], wall: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    ms = _ms
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    return LevelResult(
        side=side,
        concurrency=concurrency,
        requests=len(results),
        ok=len(ok),
        rejected=sum(r.status == 429 for r in results),
        failed=sum(not r.ok and r.status != 429 for r in results),
        wall_s=round(wall, 3),
        output_tokens_per_s=round(sum(r.completion_tokens for r in ok) / wall, 2),
        requests_per_s=round(len(ok) / wall, 3),
        mean_prompt_tokens=round(statistics.fmean([r.prompt_tokens for r in ok]), 1) if ok else 0.0,
        ttft_p50_ms=ms(percentile(ttft, 0.5)),
        ttft_p99_ms=ms(percentile(ttft, 0.99)),
        itl_p50_ms=ms(percentile(gaps, 0.5)),
        itl_p99_ms=ms(percentile(gaps, 0.99)),
        e2e_p50_s=None if not e2e else round(percentile(e2e, 0.5), 3),
        e2e_p99_s=None if not e2e else round(percentile(e2e, 0.99), 3),
    )


@contextmanager
def own_server(args: argparse.Namespace) -> Iterator[tuple[str, ServerCpu | None]]:
    """Start `edgepaged serve` on a free loopback port; stop it with SIGTERM (its drain path).
    Yields its URL and, where /proc has it, its CPU counters."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        "import typer; from edgepaged.cli.serve import serve; typer.run(serve)",
        "--profile",
        args.profile,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-waiting-requests",
        str(max(args.concurrency) * 2),
    ]
    for flag, value in (("--model", args.model), ("--backend", args.backend), ("--max-kv-blocks", args.max_kv_blocks)):
        if value is not None:
            cmd += [flag, str(value)]
    log = open(args.out / f".bench-serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready after {args.start_timeout} s; see {log.name}")
            time.sleep(0.5)
        yield url, ServerCpu(proc.pid) if Path(f"/proc/{proc.pid}/task").is_dir() else None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if proc.returncode == 0:
            os.unlink(log.name)


def card_name(args: argparse.Namespace) -> str:
    if args.card:
        return args.card
    if args.url is None:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}"


def burst(url: str, body: dict, count: int) -> list[tuple[int, float, bytes]]:
    """`count` requests sent at once over raw sockets: (status, seconds to the status line,
    response head). Raw sockets keep the client's own overhead out of the latency measured."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    conns = [socket.create_connection((host, int(port)), timeout=600) for _ in range(count)]
    sent = []
    for conn in conns:
        sent.append(time.perf_counter())
        conn.sendall(request)
    results: list[tuple[int, float, bytes]] = [(0, 0.0, b"")] * count
    with selectors.DefaultSelector() as sel:
        for i, conn in enumerate(conns):
            sel.register(conn, selectors.EVENT_READ, i)
        while sel.get_map():
            for key, _ in sel.select(timeout=600):
                i = key.data
                head = key.fileobj.recv(65536)
                results[i] = (int(head.split(b" ", 2)[1]), time.perf_counter() - sent[i], head)
                sel.unregister(key.fileobj)
                key.fileobj.close()
    return results


def burst_summary(url: str, model: str, count: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": make_prompt(10**6, 16), "max_tokens": max_tokens, "ignore_eos": True}
    results = burst(url, body, count)
    refused = [t for status, t, _ in results if status == 429]
    ms = _ms
    return {
        "sent": count,
        "accepted": sum(status == 200 for status, _, _ in results),
        "refused_429": len(refused),
        "p50_429_ms": ms(percentile(refused, 0.5)),
        "p99_429_ms": ms(percentile(refused, 0.99)),
        "max_429_ms": ms(max(refused, default=None)),
    }


def markdown(meta: dict, levels: list[LevelResult], compared: list[dict], refusals: dict) -> str:
    lines = [
        f"# edgepaged serve benchmark: {meta['card']}, {meta['date']}",
        "",
        f"Command: `{meta['command']}` on `{meta['host']}` ({meta['cpus']} CPUs; load average at the end "
        f"{', '.join(str(x) for x in meta.get('load_average_at_end', []))}).",
        "",
        (
            f"Model `{meta['model']}`, profile `{meta['profile']}`, backend `{meta['backend']}`; "
            f"{meta['prompt_words']}-word distinct prompts, {meta['max_tokens']} output tokens each "
            "(ignore_eos, greedy). `engine` drives the engine in a process of its own (no HTTP), `server` streams the same requests "
            "over loopback HTTP. ITL is the gap between streamed chunks (one token each unless the client lagged). "
            "CPU µs/tok: the server process's CPU time per streamed token, its event loop (main thread) and the rest."
        ),
        "",
    ]
    if compared:
        lines += [
            "Server against engine (ratios of the two sides of one round, which ran back to back; above 1 is "
            "the server slower in ITL, below 1 the server slower in tokens/s):",
            "",
            "| clients | rounds | engine ITL p50 ms | server ITL p50 ms | server/engine ITL | engine tok/s | server tok/s "
            "| server/engine tok/s | ITL ratio per round |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in compared:
            lines.append(
                f"| {row['concurrency']} | {row['rounds']} | {row['engine_itl_p50_ms_median']} | "
                f"{row['server_itl_p50_ms_median']} | {row['itl_ratio_median']} | {row['engine_tok_s_median']} | "
                f"{row['server_tok_s_median']} | {row['tok_s_ratio_median']} | "
                f"{', '.join(str(x) for x in row['itl_ratio_per_round'])} |"
            )
        lines += ["", "Every level (medians across rounds above):", ""]
    lines += [
        (
            "| side | round | clients | ok / sent | 429 | failed | prompt tok | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
            "| ITL p50 ms | ITL p99 ms | e2e p50 s | e2e p99 s | loop CPU µs/tok | rest CPU µs/tok |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        lines.append(
            f"| {r.side} | {r.round} | {r.concurrency} | {r.ok} / {r.requests} | {r.rejected} | {r.failed} | {r.mean_prompt_tokens} | "
            f"{r.output_tokens_per_s} | {r.requests_per_s} | {r.ttft_p50_ms} | {r.ttft_p99_ms} | {r.itl_p50_ms} | "
            f"{r.itl_p99_ms} | {r.e2e_p50_s} | {r.e2e_p99_s} | {_dash(r.loop_cpu_us_per_token)} | "
            f"{_dash(r.rest_cpu_us_per_token)} |"
        )
    lines += [
        "",
        (
            f"Burst: {refusals['sent']} requests at once over raw sockets: {refusals['accepted']} accepted, "
            f"{refusals['refused_429']} refused with 429 in {refusals['p50_429_ms']} ms (p50), "
            f"{refusals['p99_429_ms']} ms (p99), {refusals['max_429_ms']} ms at most"
            + (f"; the event loop spent {refusals['loop_cpu_ms']} ms of CPU on the burst." if "loop_cpu_ms" in refusals else ".")
        ),
    ]
    return "\n".join(lines) + "\n"


def local_engine(args: argparse.Namespace):
    """The engine as the server builds it, warmed up as the server warms it."""
    from edgepaged.engine import LLMEngine
    from edgepaged.profiles import load_profile
    from edgepaged.server import warm_up

    profile = load_profile(args.profile)
    engine = LLMEngine.from_model(args.model, profile, max_kv_blocks=args.max_kv_blocks, backend=args.backend)
    warm_up(engine, profile.scheduler.max_num_seqs)
    return engine


_LEVEL = "LEVEL "  # how the engine process marks its answers on stdout


def engine_worker(args: argparse.Namespace) -> None:
    """--engine-worker: load the engine, then run each level asked for on stdin, one JSON line
    of run_engine_level's arguments each, answering with the level's result.

    It runs at the nice value of the server's engine thread, so on a box shared with other
    work both engines get the same share of the CPU, and the two sides differ only by what the
    server adds: on a shared 2-core box, the server's engine at +5 against this one at 0 gave
    way to the other processes and made the server look 1.4-2x slower with one client."""
    from edgepaged.server.async_engine import ENGINE_NICE

    os.nice(ENGINE_NICE)
    engine = local_engine(args)
    print(_LEVEL + "{}", flush=True)
    for line in sys.stdin:
        level = run_engine_level(engine, **json.loads(line))
        print(_LEVEL + json.dumps(asdict(level)), flush=True)


def _answer(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        if line.startswith(_LEVEL):
            return line.removeprefix(_LEVEL)
    raise SystemExit(f"the engine process exited with {proc.wait()}")


@contextmanager
def engine_process(args: argparse.Namespace) -> Iterator[Callable[..., LevelResult]]:
    """The engine alone in a process of its own; yields a function that runs one level on it."""
    cmd = [sys.executable, __file__, "--engine-worker", "--profile", args.profile]
    for flag, value in (("--model", args.model), ("--backend", args.backend), ("--max-kv-blocks", args.max_kv_blocks)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _answer(proc)  # loaded and warmed up

        def run(**level: object) -> LevelResult:
            proc.stdin.write(json.dumps(level) + "\n")
            proc.stdin.flush()
            return LevelResult(**json.loads(_answer(proc)))

        yield run
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench(
    url: str, args: argparse.Namespace, engine: Callable[..., LevelResult] | None = None, cpu: ServerCpu | None = None
) -> tuple[str, list[LevelResult], dict]:
    """Every level, `args.rounds` times, on the server at `url` and (when given) the engine."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    levels, first_id = [], 0
    for r in range(args.rounds):
        for c in args.concurrency:
            n = args.requests or max(16, 4 * c)
            sides = ["server"] if engine is None else ["engine", "server"][:: 1 if r % 2 == 0 else -1]
            for side in sides:
                if side == "engine":
                    level = engine(
                        concurrency=c, requests=n, prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                        time_limit=args.time_limit, first_id=first_id,
                    )
                else:
                    before = cpu.sample() if cpu else None
                    level = asyncio.run(
                        run_level(url, model, c, n, args.prompt_words, args.max_tokens, args.time_limit, first_id)
                    )
                    tokens = level.output_tokens_per_s * level.wall_s
                    if cpu and tokens:
                        (loop0, all0), (loop1, all1) = before, cpu.sample()
                        level.loop_cpu_us_per_token = round((loop1 - loop0) / tokens * 1e6, 1)
                        level.rest_cpu_us_per_token = round((all1 - all0 - (loop1 - loop0)) / tokens * 1e6, 1)
                level.round = r
                first_id += n
                levels.append(level)
                print(json.dumps(asdict(level)), flush=True)
    before = cpu.sample() if cpu else None
    refusals = burst_summary(url, model, args.burst, args.max_tokens)
    if cpu:
        # Over the whole burst, the accepted requests' admission included.
        refusals["loop_cpu_ms"] = round((cpu.sample()[0] - before[0]) * 1000, 1)
    print(json.dumps(refusals), flush=True)
    return model, levels, refusals


def comparison(levels: list[LevelResult]) -> list[dict]:
    """Per concurrency level: the server/engine ratio of ITL p50 and of tokens/s in each round
    (both sides of a round ran back to back), and the median over the rounds."""
    rows = []
    for c in sorted({lv.concurrency for lv in levels}):
        pairs = []
        for r in sorted({lv.round for lv in levels}):
            side = {lv.side: lv for lv in levels if lv.concurrency == c and lv.round == r}
            if {"engine", "server"} <= side.keys() and side["engine"].itl_p50_ms and side["server"].itl_p50_ms:
                eng, srv = side["engine"], side["server"]
                pairs.append((srv.itl_p50_ms / eng.itl_p50_ms, srv.output_tokens_per_s / eng.output_tokens_per_s, eng, srv))
        if not pairs:
            continue
        rows.append({
            "concurrency": c,
            "rounds": len(pairs),
            "itl_ratio_per_round": [round(p[0], 3) for p in pairs],
            "tok_s_ratio_per_round": [round(p[1], 3) for p in pairs],
            "itl_ratio_median": round(statistics.median(p[0] for p in pairs), 3),
            "tok_s_ratio_median": round(statistics.median(p[1] for p in pairs), 3),
            "engine_itl_p50_ms_median": round(statistics.median(p[2].itl_p50_ms for p in pairs), 2),
            "server_itl_p50_ms_median": round(statistics.median(p[3].itl_p50_ms for p in pairs), 2),
            "engine_tok_s_median": round(statistics.median(p[2].output_tokens_per_s for p in pairs), 2),
            "server_tok_s_median": round(statistics.median(p[3].output_tokens_per_s for p in pairs), 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="benchmark a running server instead of starting one (no engine-alone levels)")
    parser.add_argument("--model", help="model folder or .gguf for the server this script starts")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--backend")
    parser.add_argument("--max-kv-blocks", type=int)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: 4 x clients, at least 16)"
    )
    parser.add_argument("--prompt-words", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--time-limit", type=float, default=120.0, help="seconds per level before no new request starts"
    )
    parser.add_argument("--burst", type=int, default=200, help="requests sent at once to time the 429s")
    parser.add_argument(
        "--rounds", type=int, default=1, help="times every level runs on each side, alternating which side goes first"
    )
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--card", help="name for the report (default: the CUDA device, else cpu-<arch>)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    if args.engine_worker:
        engine_worker(args)
        return
    if args.url is None:
        with engine_process(args) as engine, own_server(args) as (url, cpu):
            model, levels, refusals = bench(url, args, engine, cpu)
    else:
        model, levels, refusals = bench(args.url.rstrip("/"), args)
    compared = comparison(levels)

    card = card_name(args)
    date = dt.date.today().isoformat()
    meta = {
        "card": card,
        "date": date,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "model": model,
        "profile": args.profile if args.url is None else "(remote)",
        "backend": args.backend or ("profile default" if args.url is None else "(remote)"),
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    stem = args.out / f"serve-{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}-{date}"
    report = {**meta, "levels": [asdict(lv) for lv in levels], "server_vs_engine": compared, "burst": refusals}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, levels, compared, refusals))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()

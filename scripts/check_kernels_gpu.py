"""Check and time the paged-attention kernels on one CUDA GPU.

Runs tests/test_kernels_gpu.py (every kernel against its reference, full matrix), then times one
layer's attention with triton.testing.do_bench (median, L2 flushed between runs):
  - decode at batch 1/32/256 with 1k/4k contexts, with the split-K heuristic, forced single
    pass, and the plan a CUDA graph captures (sized for a 32k context, each sequence splitting
    its own context), as achieved GB/s of K/V read against the device-to-device copy bandwidth
    measured here;
  - prefill chunks (whole prompt, chunk after a cached prefix, RAG-style batch of chunks after a
    shared 1k prefix), as TFLOP/s against a bf16 GEMM measured here.
docs/benchmarks/kernels-notes.md has the bytes and FLOPs of every shape, i.e. the floors.
Prints a table and writes JSON to --out.

    python scripts/check_kernels_gpu.py --out docs/benchmarks/kernels-h100.json
    python scripts/check_kernels_gpu.py --out /tmp/k.json --skip-tests --sweep   # also try other tiles
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from run_report import gpu_run_facts
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

import edgepaged.kernels.paged_decode as decode_mod
import edgepaged.kernels.paged_prefill as prefill_mod
from edgepaged.kernels import paged_decode_attention, paged_prefill_attention, plan_decode

REPO = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16
# (name, query heads, KV heads, head dim) of one attention layer
SHAPES = [("llama-3.2-1b", 32, 8, 64), ("llama-3.1-8b", 32, 8, 128)]
GRAPH_PLAN_CONTEXT = 32768  # max_model_len of the h100/h200 profiles: what a captured decode plans for
DECODE_POINTS = [(batch, context) for batch in (1, 32, 256) for context in (1024, 4096)]
# (name, [(context_len, query_len) per sequence])
PREFILL_POINTS = [
    ("prompt 2048", [(2048, 2048)]),
    ("chunk 512 after 1536 cached", [(2048, 512)]),
    ("8 prompts of 512", [(512, 512)] * 8),
    ("rag 16 x 256 after shared 1024", [(1280, 256)] * 16),
]
DECODE_SWEEP = [(64, 4, 2), (32, 4, 2), (64, 8, 2), (64, 4, 3), (32, 4, 4)]
PREFILL_SWEEP = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)]


@dataclass(slots=True)
class DecodeTiming:
    shape: str
    batch: int
    context: int
    splits: int
    ms: float
    ms_single_pass: float
    ms_graph_plan: float
    kv_bytes: int
    gbps: float
    fraction_of_copy: float


@dataclass(slots=True)
class PrefillTiming:
    shape: str
    case: str
    tokens: int
    ms: float
    flops: int
    kv_bytes: int
    tflops: float
    fraction_of_gemm: float


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting the read and the write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def gemm_tflops(dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    b = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def paged_cache(num_seqs: int, context: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """A cache holding exactly the sequences' blocks, handed out in random order."""
    blocks_per_seq = triton.cdiv(context, BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(num_seqs, blocks_per_seq)
    return k_cache, v_cache, tables


def time_decode(shape, batch: int, context: int, dtype: torch.dtype, copy_gbps: float) -> DecodeTiming:
    name, num_q_heads, num_kv_heads, head_dim = shape
    k_cache, v_cache, tables = paged_cache(batch, context, num_kv_heads, head_dim, dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_q_heads, head_dim, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    timings = {}
    for label, splits, plan_len in (("heuristic", None, context), ("single", 1, context), ("graph", None, GRAPH_PLAN_CONTEXT)):
        plan = plan_decode(batch, num_q_heads, num_kv_heads, head_dim, plan_len, "cuda", num_splits=splits)
        run = lambda plan=plan: paged_decode_attention(
            q, k_cache, v_cache, tables, lens, head_dim**-0.5, out=out, plan=plan
        )
        timings[label] = (do_bench(run, return_mode="median"), plan.num_splits)
    ms, splits = timings["heuristic"]
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * k_cache.element_size()
    gbps = kv_bytes / ms / 1e6
    return DecodeTiming(
        name, batch, context, splits, ms, timings["single"][0], timings["graph"][0], kv_bytes, gbps, gbps / copy_gbps
    )


def time_prefill(
    shape, case: str, seqs: list[tuple[int, int]], dtype: torch.dtype, peak_tflops: float
) -> PrefillTiming:
    name, num_q_heads, num_kv_heads, head_dim = shape
    longest = max(c for c, _ in seqs)
    k_cache, v_cache, tables = paged_cache(len(seqs), longest, num_kv_heads, head_dim, dtype)
    lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device="cuda")
    query_lens = [n for _, n in seqs]
    starts = torch.tensor([0] + query_lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), num_q_heads, head_dim, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    run = lambda: paged_prefill_attention(
        q, k_cache, v_cache, tables, starts, lens, head_dim**-0.5, out=out, max_query_len=max(query_lens)
    )
    ms = do_bench(run, return_mode="median")
    # query i of a chunk of n sees context - n + i + 1 keys; QK^T and PV are 2 FLOPs per MAC each
    visible = sum(n * (c - n) + n * (n + 1) // 2 for c, n in seqs)
    flops = 4 * visible * num_q_heads * head_dim
    kv_bytes = 2 * sum(c for c, _ in seqs) * num_kv_heads * head_dim * k_cache.element_size()
    tflops = flops / ms / 1e9
    return PrefillTiming(name, case, sum(query_lens), ms, flops, kv_bytes, tflops, tflops / peak_tflops)


def run_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith("FAILED")]
    return {
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr[-2000:],
        "failures": failures,
    }


def _try(tiles: tuple, timed) -> dict:
    """One sweep point; a tile shape the card cannot run is recorded, not fatal."""
    try:
        t = timed()
    except OutOfResources as e:
        return {"tiles": tiles, "error": str(e)}
    return {"kernel": "decode" if isinstance(t, DecodeTiming) else "prefill", "tiles": tiles, **asdict(t)}


def sweep(dtype: torch.dtype, copy_gbps: float, peak_tflops: float) -> list[dict]:
    """Time other tile shapes by swapping the modules' tile choice; the defaults are not changed."""
    rows = []
    default_decode, default_prefill = decode_mod._decode_tiles, prefill_mod._tile_shape
    try:
        for tiles in DECODE_SWEEP:
            decode_mod._decode_tiles = lambda _dtype, tiles=tiles: tiles
            for shape in SHAPES:
                for batch, context in ((1, 4096), (256, 4096)):
                    point = (shape, batch, context, dtype, copy_gbps)
                    rows.append(_try(tiles, lambda point=point: time_decode(*point)))
        decode_mod._decode_tiles = default_decode
        for tiles in PREFILL_SWEEP:
            prefill_mod._tile_shape = lambda _d, _dtype, tiles=tiles: tiles
            for shape in SHAPES:
                for case, seqs in PREFILL_POINTS[:2]:
                    point = (shape, case, seqs, dtype, peak_tflops)
                    rows.append(_try(tiles, lambda point=point: time_prefill(*point)))
    finally:
        decode_mod._decode_tiles, prefill_mod._tile_shape = default_decode, default_prefill
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--skip-tests", action="store_true", help="only time (the tests take a few minutes)")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)

    result = {
        **gpu_run_facts(),
        "dtype": args.dtype,
        "block_size": BLOCK_SIZE,
    }
    if not args.skip_tests:
        result["tests"] = run_tests()
        print(f"tests: {result['tests']['summary']}")
        for line in result["tests"]["failures"]:
            print(f"  {line}")

    copy_gbps, peak_tflops = copy_bandwidth_gbps(), gemm_tflops(dtype)
    result |= {"copy_gbps": copy_gbps, "gemm_tflops": peak_tflops}
    print(
        f"{result['device']}: device-to-device copy {copy_gbps:.0f} GB/s, {args.dtype} GEMM {peak_tflops:.0f} TFLOP/s"
    )

    decode = [time_decode(s, b, c, dtype, copy_gbps) for s in SHAPES for b, c in DECODE_POINTS]
    print(
        f"\n{'decode':14} {'batch':>5} {'ctx':>5} {'splits':>6} {'us':>8} {'us 1-pass':>9} {'us graph':>9} "
        f"{'KV MB':>8} {'GB/s':>7} {'of copy':>7}"
    )
    for t in decode:
        print(
            f"{t.shape:14} {t.batch:5} {t.context:5} {t.splits:6} {t.ms * 1e3:8.1f} {t.ms_single_pass * 1e3:9.1f} "
            f"{t.ms_graph_plan * 1e3:9.1f} "
            f"{t.kv_bytes / 1e6:8.1f} {t.gbps:7.0f} {t.fraction_of_copy:7.0%}"
        )

    prefill = [time_prefill(s, case, seqs, dtype, peak_tflops) for s in SHAPES for case, seqs in PREFILL_POINTS]
    print(f"\n{'prefill':14} {'case':32} {'tokens':>6} {'us':>8} {'GFLOP':>7} {'TFLOP/s':>7} {'of GEMM':>7}")
    for t in prefill:
        print(
            f"{t.shape:14} {t.case:32} {t.tokens:6} {t.ms * 1e3:8.1f} "
            f"{t.flops / 1e9:7.1f} {t.tflops:7.1f} {t.fraction_of_gemm:7.0%}"
        )
    result |= {"decode": [asdict(t) for t in decode], "prefill": [asdict(t) for t in prefill]}

    if args.sweep:
        result["sweep"] = sweep(dtype, copy_gbps, peak_tflops)
        print("\nsweep (tiles: decode BLOCK_N, warps, stages | prefill BLOCK_M, BLOCK_N, warps, stages)")
        for row in result["sweep"]:
            if "error" in row:
                print(f"{row['tiles']!s:18} cannot run: {row['error']}")
                continue
            speed = f"{row['gbps']:6.0f} GB/s" if row["kernel"] == "decode" else f"{row['tflops']:6.1f} TFLOP/s"
            where = f"b{row['batch']} ctx{row['context']}" if row["kernel"] == "decode" else row["case"]
            print(
                f"{row['kernel']:8} {row['tiles']!s:18} {row['shape']:14} {where:30} {row['ms'] * 1e3:8.1f} us {speed}"
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if not args.skip_tests and result["tests"]["returncode"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Time the W4A16 / W8A16 kernels against dense bf16 F.linear on one CUDA GPU.

The four linear layers of Llama-3.2-1B (hidden 2048, intermediate 8192, 32/8 heads of 64: fused
qkv N=3072 K=2048, o N=2048 K=2048, fused gate_up N=16384 K=2048, down N=2048 K=8192; 16 layers)
at decode T=1 and T=16 and prefill T=1024, for
  - bf16: torch F.linear on a bf16 weight (cuBLAS),
  - w8a16 g32: int8 weights, one fp16 scale per 32 (the GGUF Q8_0 shape),
  - w4a16 g32 / g128: int4 weights, fp16 scale + offset per 32 (Q4_1) or 128 (AWQ/GPTQ).

Timing: each call is captured in a CUDA graph once per weight copy, over enough copies of the
weight (different buffers, same values) that they overflow L2 about three times, so every call
reads its weights from DRAM as a decode step reads each layer's, and host launch cost is out of
the figure; the graph is replayed and the median per call is reported. "MB" is the least a call
must move (weights with their scales/offsets, x, the output); "of copy" divides its GB/s by a
device-to-device copy's (read + write, 1 GiB) measured here. At T=1 on a big GPU these layers are
small enough (1-16 MB) that the per-kernel cost inside a graph (a few us) is a large part of
the time; the fraction of copy bandwidth is the figure that carries over to a Jetson, where the
same bytes take 20-70x longer. Prefill rows also give TFLOP/s. One run is under 60 s on an H200.

    python scripts/check_quant_gpu.py                       # docs/benchmarks/quant-kernels-<card>-<date>.json + .md
    python scripts/check_quant_gpu.py --out /tmp/quant.json  # and /tmp/quant.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from run_report import card_slug, gpu_run_facts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a bare checkout: `kernels` importable even without edgepaged installed

try:
    from edgepaged.kernels import w4a16_linear, w8a16_linear
    from edgepaged.kernels.quant_reference import quantize_int4, quantize_int8, w4a16_linear_ref, w8a16_linear_ref
except ImportError:
    from kernels import w4a16_linear, w8a16_linear
    from kernels.quant_reference import quantize_int4, quantize_int8, w4a16_linear_ref, w8a16_linear_ref

# (name, N, K), Llama-3.2-1B
LAYERS = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)]
NUM_LAYERS = 16
TOKENS = [1, 16, 1024]
KINDS = ["bf16", "w8a16-g32", "w4a16-g32", "w4a16-g128"]
DTYPE = torch.bfloat16


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting the read and the write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() / (statistics.median(times[2:]) * 1e-3) / 1e9


def make_weight(kind: str, n: int, k: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """(the tensors a call reads, group size) for `kind`, from one random [N, K] weight."""
    w = torch.randn(n, k, device="cuda") * 0.05
    if kind == "bf16":
        return (w.to(DTYPE),), 0
    bits, group = int(kind[1]), int(kind.split("-g")[1])
    return (quantize_int4(w, group) if bits == 4 else quantize_int8(w, group)), group


def call(kind: str, x: torch.Tensor, weight: tuple[torch.Tensor, ...], group: int) -> torch.Tensor:
    if kind == "bf16":
        return F.linear(x, weight[0])
    if kind.startswith("w4"):
        return w4a16_linear(x, *weight, group)
    return w8a16_linear(x, *weight, group)


def reference(kind: str, x: torch.Tensor, weight: tuple[torch.Tensor, ...], group: int) -> torch.Tensor:
    if kind.startswith("w4"):
        return w4a16_linear_ref(x, *weight, group)
    return w8a16_linear_ref(x, *weight, group)


def time_per_call(kind: str, x: torch.Tensor, weight: tuple[torch.Tensor, ...], group: int, l2_bytes: int) -> float:
    """Microseconds per call, L2-cold weights, from a CUDA graph of one call per weight copy."""
    return time_graphed(lambda wc: call(kind, x, wc, group), weight, l2_bytes)


def time_graphed(fn, weight: tuple[torch.Tensor, ...], l2_bytes: int) -> float:
    """Microseconds per `fn(weight copy)`, from a CUDA graph of one call per copy of the weight,
    over enough copies that they overflow L2 about three times."""
    nbytes = sum(t.numel() * t.element_size() for t in weight)
    copies = max(2, min(64, -(-3 * l2_bytes // nbytes)))
    weights = [weight] + [tuple(t.clone() for t in weight) for _ in range(copies - 1)]
    fn(weight)  # compile, and let cuBLAS pick its kernel, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for wc in weights:
            fn(wc)
    graph.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    del graph, weights
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (the .md goes beside it)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 64 << 20) or (64 << 20)
    facts = gpu_run_facts()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{facts['device']}: {props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB, copy {copy_gbps:.0f} GB/s")

    rows = []
    for name, n, k in LAYERS:
        for kind in KINDS:
            weight, group = make_weight(kind, n, k)
            weight_bytes = sum(t.numel() * t.element_size() for t in weight)
            check = None
            for tokens in TOKENS:
                x = torch.randn(tokens, k, device="cuda").to(DTYPE)
                if kind != "bf16" and tokens == 16:  # a timed kernel must also be a right one
                    out = call(kind, x, weight, group).float()
                    ref = reference(kind, x, weight, group)
                    check = float((out - ref).abs().max() / ref.abs().max())
                us = time_per_call(kind, x, weight, group, l2_bytes)
                moved = weight_bytes + (tokens * k + tokens * n) * 2
                gbps = moved / (us * 1e-6) / 1e9
                rows.append({
                    "layer": name, "n": n, "k": k, "tokens": tokens, "kind": kind, "us": us,
                    "bytes": moved, "weight_bytes": weight_bytes, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
                    "tflops": 2 * tokens * n * k / (us * 1e-6) / 1e12,
                })
            for row in rows[-len(TOKENS):]:
                row["rel_err_t16"] = check
            del weight
    for row in rows:
        dense = next(r for r in rows if (r["layer"], r["tokens"], r["kind"]) == (row["layer"], row["tokens"], "bf16"))
        row["speedup_vs_bf16"] = dense["us"] / row["us"]

    per_step = {}  # one decode step's linears (lm_head excluded): 16 layers x the four layers
    for kind in KINDS:
        for tokens in TOKENS:
            per_step[f"{kind}-t{tokens}"] = NUM_LAYERS * sum(
                r["us"] for r in rows if r["kind"] == kind and r["tokens"] == tokens
            )

    lines = [
        f"# W4A16 / W8A16 kernels on {facts['device']}, {facts['date'][:10]}",
        "",
        f"Device-to-device copy: {copy_gbps:.0f} GB/s. L2-cold weights, CUDA-graph replay, median per call.",
        f"`{facts['command']}` (torch {facts['torch']}, triton {facts['triton']})",
        "",
        "| layer | N x K | T | kind | us | MB moved | GB/s | of copy | TFLOP/s | vs bf16 | rel err (T=16) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        err = "" if r["rel_err_t16"] is None else f"{r['rel_err_t16']:.1e}"
        lines.append(
            f"| {r['layer']} | {r['n']} x {r['k']} | {r['tokens']} | {r['kind']} | {r['us']:.1f} | {r['bytes'] / 1e6:.2f} | "
            f"{r['gbps']:.0f} | {r['fraction_of_copy']:.0%} | {r['tflops']:.1f} | {r['speedup_vs_bf16']:.2f}x | {err} |"
        )
    lines += ["", f"Linears of one step ({NUM_LAYERS} layers, lm_head excluded), us:", ""]
    lines += ["| kind | " + " | ".join(f"T={t}" for t in TOKENS) + " |", "|---|" + "---:|" * len(TOKENS)]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{per_step[f'{kind}-t{t}']:.0f}" for t in TOKENS) + " |")
    table = "\n".join(lines) + "\n"
    print(table)

    out = args.out
    if out is None:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        out = REPO / "docs" / "benchmarks" / f"quant-kernels-{card_slug(facts['device'])}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = facts | {
        "sms": props.multi_processor_count, "l2_bytes": l2_bytes, "copy_gbps": copy_gbps, "rows": rows,
        "step_linears_us": per_step, "seconds": time.perf_counter() - t0,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()

"""Search the W4A16 / W8A16 decode kernel's tiles and the prefill dispatch point on one GPU.

The decode kernel's block sizes are fixed rules (kernels/quant_matmul.py says why: no
autotuning at serve time). This script is where those rules come from. On the four linear
layers of Llama-3.2-1B (scripts/check_quant_gpu.py's LAYERS, timed the same way: L2-cold
weights, CUDA-graph replay) it times, for int4 g32 (GGUF Q4_0/Q4_1), int4 g128 (GPTQ/AWQ) and
int8 g32 (Q8_0):
  1. decode at T = 1 and T = 16: the current rules, then a staged search (tile rows, bytes per
     row per iteration, warps; then pipeline stages and the K split of the best tile);
  2. prefill at T = 32 ... 1024: the fused dequantizing GEMM against dequantize-then-cuBLAS
     (where `dense_min_tokens` should sit), beside dense bf16.
Every configuration is checked against the reference before it is timed.

    python scripts/tune_quant_gpu.py     # docs/benchmarks/quant-tune-<card>-<date>.json + .md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from check_quant_gpu import DTYPE, LAYERS, NUM_LAYERS, make_weight, reference, time_graphed
from run_report import card_slug, gpu_run_facts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
try:
    import edgepaged.kernels.quant_matmul as qm
except ImportError:
    import kernels.quant_matmul as qm

KINDS = ["w4a16-g32", "w4a16-g128", "w8a16-g32"]
PREFILL_TOKENS = [32, 64, 128, 256, 1024]


def bits_of(kind: str) -> int:
    return int(kind[1])


def launch(kind: str, x: torch.Tensor, weight, group: int, plan=None) -> torch.Tensor:
    bits = bits_of(kind)
    q, s, *o = weight
    return qm._quant_linear(x, q, s, o[0] if o else None, group, None, bits, None, plan)


def plans(tokens: int, n: int, k: int, group: int, bits: int, sms: int):
    """Candidate decode plans: stage 1 varies the tile, stage 2 (`refine`) the rest."""
    if tokens == 1:
        rows, row_bytes, warps = (4, 8, 16, 32), (64, 128, 256, 512), (1, 2, 4, 8)
    else:
        rows, row_bytes, warps = (16, 32, 64), (group * bits // 8, 2 * group * bits // 8, 4 * group * bits // 8), (2, 4, 8)
    for block_n, nbytes, nw in itertools.product(rows, row_bytes, warps):
        gpi = max(1, nbytes * 8 // bits // group)
        yield make_plan(tokens, n, k, group, block_n, gpi, nw, 2, 4, sms)


def make_plan(tokens, n, k, group, block_n, gpi, num_warps, num_stages, programs_per_sm, sms) -> qm.QuantDecodePlan:
    num_groups = k // group
    wanted = triton.cdiv(programs_per_sm * sms, triton.cdiv(n, block_n))
    split = max(1, min(wanted, k // qm._MIN_SPLIT_K, qm._MAX_SPLITS))
    per_split = triton.cdiv(num_groups, split)
    if per_split >= gpi:
        per_split = triton.cdiv(per_split, gpi) * gpi
    return qm.QuantDecodePlan(1 if tokens == 1 else 16, block_n, gpi, per_split, triton.cdiv(num_groups, per_split),
                              num_warps, num_stages)


def refine(best: qm.QuantDecodePlan, tokens, n, k, group, sms):
    for stages, pps in itertools.product((1, 2, 3, 4), (0, 1, 2, 4, 8, 16)):
        yield make_plan(tokens, n, k, group, best.block_n, best.groups_per_iter, best.num_warps, stages, pps, sms)


def timed_plan(kind, x, weight, group, plan, l2, ref) -> float | None:
    try:
        out = launch(kind, x, weight, group, plan).float()
    except Exception as exc:  # a tile the backend cannot build: skip it, say so
        print(f"    {plan}: {type(exc).__name__}", flush=True)
        return None
    err = float((out - ref).abs().max() / ref.abs().max())
    if not err < 1e-2:
        print(f"    {plan}: wrong (rel err {err:.1e})", flush=True)
        return None
    return time_graphed(lambda wc: launch(kind, x, wc, group, plan), weight, l2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget-s", type=float, default=420, help="stop searching (and report) after this long")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", 64 << 20) or (64 << 20)
    facts = gpu_run_facts()
    result = facts | {"decode": [], "prefill": []}
    out = args.out or REPO / "docs" / "benchmarks" / f"quant-tune-{card_slug(facts['device'])}-{datetime.now(timezone.utc):%Y-%m-%d}.json"

    def save():
        result["seconds"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))

    for kind in KINDS:
        bits = bits_of(kind)
        for name, n, k in LAYERS:
            weight, group = make_weight(kind, n, k)
            dense = make_weight("bf16", n, k)[0]
            for tokens in (1, 16):
                if time.perf_counter() - t0 > args.budget_s:
                    break
                x = torch.randn(tokens, k, device="cuda").to(DTYPE)
                ref = reference(kind, x, weight, group)
                rule = qm.plan_quant_decode(tokens, n, k, group, bits, x.device, None, x.dtype)
                rule_us = timed_plan(kind, x, weight, group, rule, l2, ref)
                bf16_us = time_graphed(lambda wc: F.linear(x, wc[0]), dense, l2)
                tried = [(timed_plan(kind, x, weight, group, p, l2, ref), p) for p in plans(tokens, n, k, group, bits, sms)]
                tried = [(us, p) for us, p in tried if us is not None]
                best_us, best = min(tried)
                tried2 = [(timed_plan(kind, x, weight, group, p, l2, ref), p) for p in refine(best, tokens, n, k, group, sms)]
                best_us, best = min([(us, p) for us, p in tried2 if us is not None] + [(best_us, best)])
                row = {"kind": kind, "layer": name, "n": n, "k": k, "tokens": tokens, "rule": rule._asdict(),
                       "rule_us": rule_us, "best": best._asdict(), "best_us": best_us, "bf16_us": bf16_us,
                       "top5": [{"us": us, **p._asdict()} for us, p in sorted(tried + tried2, key=lambda t: t[0])[:5]]}
                result["decode"].append(row)
                print(f"{kind} {name} T={tokens}: rule {rule_us:.1f} us, best {best_us:.1f} us {tuple(best)}, "
                      f"bf16 {bf16_us:.1f} us", flush=True)
                save()
            for tokens in PREFILL_TOKENS:
                if time.perf_counter() - t0 > args.budget_s:
                    break
                x = torch.randn(tokens, k, device="cuda").to(DTYPE)
                q, s, *o = weight
                o = o[0] if o else None
                saved, qm.dense_min_tokens = qm.dense_min_tokens, lambda device: 1 << 30
                try:
                    fused_us = time_graphed(lambda wc: launch(kind, x, wc, group), weight, l2)
                finally:
                    qm.dense_min_tokens = saved
                deq_us = time_graphed(lambda wc: qm._dequantized_linear(x, wc[0], wc[1], wc[2] if len(wc) > 2 else None,
                                                                        group, None, bits), weight, l2)
                bf16_us = time_graphed(lambda wc: F.linear(x, wc[0]), dense, l2)
                result["prefill"].append({"kind": kind, "layer": name, "tokens": tokens, "fused_us": fused_us,
                                          "dequant_dense_us": deq_us, "bf16_us": bf16_us})
                print(f"{kind} {name} T={tokens}: fused {fused_us:.1f} us, dequant+dense {deq_us:.1f} us, bf16 {bf16_us:.1f} us",
                      flush=True)
            save()
            del weight, dense
    save()
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.perf_counter() - t0:.0f} s")


def markdown(r: dict) -> str:
    lines = [f"# Quantized kernel search on {r['device']}, {r['date'][:10]}", "", f"`{r['command']}` (torch {r['torch']}, "
             f"triton {r['triton']}); L2-cold weights, CUDA-graph replay, us per call.", "",
             "## Decode", "", "| kind | layer | T | rule us | best us | gain | bf16 us | best plan (block_n, groups/iter, "
             "groups/split, splits, warps, stages) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for d in r["decode"]:
        b = d["best"]
        lines.append(f"| {d['kind']} | {d['layer']} | {d['tokens']} | {d['rule_us']:.1f} | {d['best_us']:.1f} | "
                     f"{d['rule_us'] / d['best_us']:.2f}x | {d['bf16_us']:.1f} | {b['block_n']}, {b['groups_per_iter']}, "
                     f"{b['groups_per_split']}, {b['splits']}, {b['num_warps']}, {b['num_stages']} |")
    for kind in KINDS:
        for tokens in (1, 16):
            mine = [d for d in r["decode"] if d["kind"] == kind and d["tokens"] == tokens]
            if len(mine) == len(LAYERS):
                lines.append(f"| {kind} | one step ({NUM_LAYERS} layers) | {tokens} | {NUM_LAYERS * sum(d['rule_us'] for d in mine):.0f} | "
                             f"{NUM_LAYERS * sum(d['best_us'] for d in mine):.0f} | | {NUM_LAYERS * sum(d['bf16_us'] for d in mine):.0f} | |")
    lines += ["", "## Prefill: fused dequantizing GEMM against dequantize + cuBLAS", "",
              "| kind | layer | T | fused us | dequant + dense us | bf16 us |", "|---|---|---:|---:|---:|---:|"]
    for p in r["prefill"]:
        lines.append(f"| {p['kind']} | {p['layer']} | {p['tokens']} | {p['fused_us']:.1f} | {p['dequant_dense_us']:.1f} | {p['bf16_us']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

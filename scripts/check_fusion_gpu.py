"""What each batch-1 decode fusion (edgepaged.config.DecodeFusions) buys, on one CUDA GPU.

    python scripts/check_fusion_gpu.py                       # both shapes, under 4 minutes on an H200
    python scripts/check_fusion_gpu.py --models smollm2-135m --models-dir /tmp/bench-models

For the SmolLM2-135M and Llama-3.2-1B shapes (random bf16 weights, bench_gpu's checkpoints and
batch-1 engine), every configuration runs on one engine, switched with
ModelRunner.set_decode_fusions (graphs captured again each time): no fusion, each fusion alone
(or the --configs given), the default (DecodeFusions()),
every fusion on. Per configuration: batch-1 decode tok/s with CUDA graphs (bench_gpu's
batch1_decode: a 128-token prompt, 256 new tokens, overlapped steps; also one step at a time)
and kernels per decode step counted by torch.profiler over eager steps (a graph replay may hide
its kernels from the profiler) and over replayed ones (where the profiler sees them, the count
that matters: the graph's attention plan is for the longest context, so it splits). The greedy
tokens of each configuration are compared with the unfused ones. Then, time permitting
(--budget-s), the GEMV tiles: every projection of both shapes as a plain decode_gemv with the
default tiles (kernels.decode_gemv.gemv_tiles) and a few others, against cuBLAS (F.linear) on
the same [1, K] x [N, K]^T, L2-cold weights in a CUDA graph (check_quant_gpu.time_graphed), and
the lm_head's ARGMAX launch against F.linear + argmax. Writes
docs/benchmarks/fusion-<card>-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import REPO, batch1_decode, batch1_engine, copy_gbps, model_folder, profile_steps  # noqa: E402
from check_quant_gpu import time_graphed  # noqa: E402
from run_report import card_slug, gpu_run_facts  # noqa: E402

from edgepaged import SamplingParams  # noqa: E402
from edgepaged.config import DecodeFusions  # noqa: E402
from edgepaged.kernels import ARGMAX, argmax_scratch_for, decode_gemv  # noqa: E402
from edgepaged.kernels.decode_gemv import GemvTiles, gemv_tiles  # noqa: E402
from edgepaged.models.random_init import SHAPES as MODEL_SHAPES  # noqa: E402

SHAPES = ("smollm2-135m", "llama-3.2-1b")
GOALS = {"smollm2-135m": {"tok_s": 1210, "kernels": 120}, "llama-3.2-1b": {"tok_s": 1040, "kernels": None}}
LLAMA_CPP = {"smollm2-135m": 968, "llama-3.2-1b": 829}  # llama-bench tg128, same card (DESIGN.md)


def configurations(chosen: list[str] | None) -> dict[str, DecodeFusions]:
    """none, each fusion alone (or the `chosen` EDGEPAGED_FUSIONS values), the default, all."""
    names = [f.name for f in dataclasses.fields(DecodeFusions)]
    configs = {"none": DecodeFusions.parse("none")}
    if chosen is None:
        configs |= {f"{name} only": DecodeFusions.parse(name) for name in names}
    else:
        configs |= {text: DecodeFusions.parse(text) for text in chosen}
    configs["default"] = DecodeFusions()
    configs["all"] = DecodeFusions.parse("all")
    return configs


def count_kernels(engine, vocab: int, use_graphs: bool) -> dict:
    """Kernels per decode step over 8 steps of one sequence (128-token prompt), eager or replayed."""
    graphs = engine.runner.graphs
    prompt = np.random.default_rng(8).integers(1, vocab, 128).tolist()
    try:
        engine.runner.graphs = graphs if use_graphs else None
        engine.add_request("prof", prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        for _ in range(4):
            engine.step()
        prof = profile_steps(engine, 8)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.runner.graphs = graphs
    return {"kernels_per_step": prof["kernels_per_step"], "gpu_busy_ms_per_step": prof["gpu_busy_ms_per_step"],
            "by_kind": prof["by_kind"]}


def greedy_tokens(engine, vocab: int) -> list[int]:
    prompt = np.random.default_rng(9).integers(1, vocab, 64).tolist()
    engine.add_request("tokens", prompt, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    return engine.run_to_completion(["tokens"])["tokens"].outputs[0].token_ids


def bench_shape(folder: Path, profile: str, gbps: float, chosen: list[str] | None) -> dict:
    engine = batch1_engine(folder, profile)
    vocab = engine.model_config.vocab_size
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    rows, reference = {}, None
    for label, fusions in configurations(chosen).items():
        t0 = time.perf_counter()
        engine.runner.set_decode_fusions(fusions)
        decode = batch1_decode(engine, vocab, weights, gbps)
        kernels = count_kernels(engine, vocab, use_graphs=False)
        replayed = count_kernels(engine, vocab, use_graphs=True)
        tokens = greedy_tokens(engine, vocab)
        reference = tokens if reference is None else reference
        rows[label] = {
            "fusions": dataclasses.asdict(fusions),
            "graphs_tok_s": decode["graphs_tok_s"],
            "graphs_sync_tok_s": decode["graphs_sync_tok_s"],
            "eager_tok_s": decode["eager_tok_s"],
            **kernels,
            "graph_kernels_per_step": replayed["kernels_per_step"],
            "graph_gpu_busy_ms_per_step": replayed["gpu_busy_ms_per_step"],
            "tokens_equal_unfused": tokens == reference,
            "seconds": time.perf_counter() - t0,
        }
        print(f"  {label:12s} {decode['graphs_tok_s']:7.0f} tok/s  {kernels['kernels_per_step']:6.1f} kernels/step  "
              f"tokens {'=' if tokens == reference else '!='} unfused", flush=True)
    engine.runner.set_decode_fusions(DecodeFusions.from_env())
    return {"weights_bytes": weights, "configs": rows}


TILE_CANDIDATES = [GemvTiles(16, 256, 4), GemvTiles(4, 512, 4), GemvTiles(8, 1024, 8), GemvTiles(2, 2048, 8)]


def projections(shape: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of every weight a decode step of `shape` multiplies by."""
    c = MODEL_SHAPES[shape]
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", hidden // heads)
    return [("qkv", (heads + 2 * kv_heads) * head_dim, hidden), ("o_proj", hidden, heads * head_dim),
            ("gate_up", 2 * c["intermediate_size"], hidden), ("down", hidden, c["intermediate_size"]),
            ("lm_head", c["vocab_size"], hidden)]


def bench_tiles(shape: str, l2_bytes: int, deadline: float) -> dict:
    torch.manual_seed(0)
    rows = {}
    for name, n, k in projections(shape):
        if time.perf_counter() > deadline:
            rows[name] = {"skipped": "time budget"}
            continue
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        mb = n * k * 2 / 1e6
        row = {"n": n, "k": k, "mb": mb, "cublas_us": time_graphed(lambda wc: F.linear(x, wc[0]), (w,), l2_bytes)}
        default = gemv_tiles(k, 0)
        row["triton_us"] = {}
        for tiles in [default, *[t for t in TILE_CANDIDATES if t != default]]:
            label = f"{tiles.block_n}x{tiles.block_k}/w{tiles.num_warps}" + (" (default)" if tiles == default else "")
            row["triton_us"][label] = time_graphed(lambda wc, t=tiles: decode_gemv(x, wc[0], tiles=t), (w,), l2_bytes)
        if name == "lm_head":
            scratch = argmax_scratch_for(n, k, "cuda")
            row["argmax_us"] = time_graphed(
                lambda wc: decode_gemv(x, wc[0], epilogue=ARGMAX, argmax_scratch=scratch), (w,), l2_bytes)
            row["cublas_argmax_us"] = time_graphed(lambda wc: F.linear(x, wc[0]).float().argmax(-1), (w,), l2_bytes)
        rows[name] = row
        print(f"  {name:8s} {n}x{k}: cuBLAS {row['cublas_us']:.1f} us, triton "
              + ", ".join(f"{lbl} {us:.1f}" for lbl, us in row["triton_us"].items()), flush=True)
        del w
        torch.cuda.empty_cache()
    return rows


def tiles_markdown(shape: str, rows: dict) -> list[str]:
    lines = ["", f"### GEMV tiles, {shape} (bf16, one token, L2-cold; us per call, GB/s in brackets)", "",
             "| weight | N x K | MB | cuBLAS | Triton tiles (rows x columns / warps) |", "|---|---|---:|---:|---|"]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
            continue
        triton = ", ".join(f"{lbl}: {us:.1f} ({r['mb'] * 1e3 / us:.0f})" for lbl, us in r["triton_us"].items())
        lines.append(f"| {name} | {r['n']} x {r['k']} | {r['mb']:.1f} | {r['cublas_us']:.1f} "
                     f"({r['mb'] * 1e3 / r['cublas_us']:.0f}) | {triton} |")
        if "argmax_us" in r:
            lines.append(f"| lm_head + argmax | | | {r['cublas_argmax_us']:.1f} (F.linear, float, argmax) | "
                         f"ARGMAX epilogue: {r['argmax_us']:.1f} |")
    return lines


def recommended(results: dict) -> str:
    """The fusions whose alone-row is over 1% faster than the no-fusion row on every shape."""
    keep = []
    for f in dataclasses.fields(DecodeFusions):
        runs = [r["configs"] for r in results["models"].values() if "configs" in r]
        if runs and all(f"{f.name} only" in c for c in runs) and all(c[f"{f.name} only"]["graphs_tok_s"] > 1.01 * c["none"]["graphs_tok_s"] for c in runs):
            keep.append(f.name)
    return ",".join(keep)


def markdown(results: dict) -> str:
    lines = [
        f"# Batch-1 decode fusions: {results['device']}, {results['date']}",
        "",
        f"Command: `{results['command']}`  ",
        f"torch {results['torch']}, triton {results['triton']}; random bf16 weights, triton backend, CUDA graphs, "
        f"profile `{results['profile']}` cut to batch 1 (bench_gpu.batch1_engine). tok/s: 128-token prompt, 256 new "
        "tokens, overlapped steps (`sync`: one step at a time). Kernels: torch.profiler over 8 decode steps, eager "
        "(planned for the live context: no split at this length) and replayed (the graph's plan is for 4K: split). "
        "Gain: tok/s over the no-fusion row.",
    ]
    for shape, r in results["models"].items():
        lines += ["", f"## {shape}", ""]
        if "error" in r:
            lines += ["```", r["error"][-2000:], "```"]
            continue
        base = r["configs"]["none"]["graphs_tok_s"]
        lines += ["| fusions | tok/s | sync tok/s | gain | kernels/step eager | kernels/step in graphs | "
                  "GPU busy ms/step (graphs) | tokens = unfused |",
                  "|---|---:|---:|---:|---:|---:|---:|:---:|"]
        for label, c in r["configs"].items():
            lines.append(f"| {label} | {c['graphs_tok_s']:.0f} | {c['graphs_sync_tok_s']:.0f} | "
                         f"{c['graphs_tok_s'] / base:.3f}x | {c['kernels_per_step']:.1f} | "
                         f"{c['graph_kernels_per_step']:.1f} | {c['graph_gpu_busy_ms_per_step']:.3f} | {'yes' if c['tokens_equal_unfused'] else '**no**'} |")
        goal, best = GOALS[shape], r["configs"]["default"]
        lines += ["", f"Goal: >= {goal['tok_s']} tok/s (llama.cpp {LLAMA_CPP[shape]}): default fusions "
                  f"{best['graphs_tok_s']:.0f}" + (f"; <= {goal['kernels']} kernels/step: {best['kernels_per_step']:.1f}"
                                                   if goal["kernels"] else "") + "."]
    lines += ["", f"Fusions that beat no fusion alone by more than 1% on every shape run: "
              f"`EDGEPAGED_FUSIONS={recommended(results) or 'none'}`."]
    for shape, rows in results.get("tiles", {}).items():
        lines += tiles_markdown(shape, rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--models-dir", type=Path, help="where the random checkpoints live (written if missing)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--budget-s", type=float, default=210, help="the tile comparison stops at this point")
    parser.add_argument("--configs", nargs="+", help="EDGEPAGED_FUSIONS values to run instead of each fusion alone")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="edgepaged-fusion-"))
    facts = gpu_run_facts()
    profile = "h200-141gb" if "H200" in facts["device"] else "h100-80gb"
    results = {**facts, "date": facts["date"][:10], "time_utc": facts["date"], "profile": profile, "models": {}}
    gbps = copy_gbps()
    stem = args.out_dir / f"fusion-{card_slug(facts['device'])}-{results['date']}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for shape in args.models:
        print(f"[{shape}] ({time.perf_counter() - start:.0f} s)", flush=True)
        try:
            results["models"][shape] = bench_shape(model_folder(models_dir, shape), profile, gbps, args.configs)
        except Exception:
            import traceback

            results["models"][shape] = {"error": traceback.format_exc()}
            print(results["models"][shape]["error"], flush=True)
        torch.cuda.empty_cache()
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
    results["tiles"] = {}
    for shape in args.models:
        print(f"[tiles {shape}] ({time.perf_counter() - start:.0f} s)", flush=True)
        results["tiles"][shape] = bench_tiles(shape, l2_bytes, start + args.budget_s)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {stem}.md/.json in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

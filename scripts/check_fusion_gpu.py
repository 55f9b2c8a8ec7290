"""What each batch-1 decode fusion (edgepaged.config.DecodeFusions) buys, on one CUDA GPU.

    python scripts/check_fusion_gpu.py                       # both shapes, under 4 minutes on an H200
    python scripts/check_fusion_gpu.py --models smollm2-135m --models-dir /tmp/bench-models

For the SmolLM2-135M and Llama-3.2-1B shapes (random bf16 weights, bench_gpu's checkpoints and
batch-1 engine), every configuration runs on one engine, switched with
ModelRunner.set_decode_fusions (graphs captured again each time): no fusion, each fusion alone,
every fusion on. Per configuration: batch-1 decode tok/s with CUDA graphs (bench_gpu's
batch1_decode: a 128-token prompt, 256 new tokens, overlapped steps; also one step at a time)
and kernels per decode step counted by torch.profiler over eager steps (a graph replay may hide
its kernels from the profiler) and over replayed ones (where the profiler sees them, the count
that matters: the graph's attention plan is for the longest context, so it splits). The greedy
tokens of each configuration are compared with the unfused ones. Writes
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import REPO, batch1_decode, batch1_engine, copy_gbps, model_folder, profile_steps  # noqa: E402
from run_report import card_slug, gpu_run_facts  # noqa: E402

from edgepaged import SamplingParams  # noqa: E402
from edgepaged.config import DecodeFusions  # noqa: E402

SHAPES = ("smollm2-135m", "llama-3.2-1b")
GOALS = {"smollm2-135m": {"tok_s": 1210, "kernels": 120}, "llama-3.2-1b": {"tok_s": 1040, "kernels": None}}
LLAMA_CPP = {"smollm2-135m": 968, "llama-3.2-1b": 829}  # llama-bench tg128, same card (DESIGN.md)


def configurations() -> dict[str, DecodeFusions]:
    names = [f.name for f in dataclasses.fields(DecodeFusions)]
    configs = {"none": DecodeFusions.parse("none")}
    configs |= {f"{name} only": DecodeFusions.parse(name) for name in names}
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


def bench_shape(folder: Path, profile: str, gbps: float) -> dict:
    engine = batch1_engine(folder, profile)
    vocab = engine.model_config.vocab_size
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    rows, reference = {}, None
    for label, fusions in configurations().items():
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
        goal, best = GOALS[shape], r["configs"]["all"]
        lines += ["", f"Goal: >= {goal['tok_s']} tok/s (llama.cpp {LLAMA_CPP[shape]}): all fusions "
                  f"{best['graphs_tok_s']:.0f}" + (f"; <= {goal['kernels']} kernels/step: {best['kernels_per_step']:.1f}"
                                                   if goal["kernels"] else "") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--models-dir", type=Path, help="where the random checkpoints live (written if missing)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
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
            results["models"][shape] = bench_shape(model_folder(models_dir, shape), profile, gbps)
        except Exception:
            import traceback

            results["models"][shape] = {"error": traceback.format_exc()}
            print(results["models"][shape]["error"], flush=True)
        torch.cuda.empty_cache()
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {stem}.md/.json in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

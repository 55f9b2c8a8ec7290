"""The host's share of an engine step: scheduling, block tables, step inputs, sampling, outputs.

On a GPU a decode step of a small model takes a few milliseconds of kernels, and everything the
host does around them is on the critical path unless steps overlap (`overlap_steps`). This
measures that host work alone: the model's forward pass and logits are replaced by a stub that
returns fixed tensors, so what is timed is the engine's own Python and numpy, the same code a GPU
step runs. Steady-state decode at several batch sizes (each sequence 1,024 shared + 64-512 own
prompt tokens, as in bench_gpu.py's RAG workload), and the whole RAG burst (prefill included).
Writes docs/benchmarks/host-<machine>-<date>.md and .json with the git commit it measured.

    python scripts/bench_host.py [--batches 1 16 64 256] [--block-size 16] [--tag before]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_gpu import OUTPUT_TOKENS, KvUse, rag_prompts  # the same workload and KV-use count as the GPU benchmark

from edgepaged import OutputKind, SamplingParams
from edgepaged.config import EngineConfig
from edgepaged.engine import LLMEngine
from edgepaged.models.random_init import write_random_model

VOCAB = 32000


def stub_engine(folder: Path, block_size: int, max_num_seqs: int, num_blocks: int) -> LLMEngine:
    """An engine whose model costs nothing: a zero hidden state per token, fixed logits."""
    config = EngineConfig(
        device=torch.device("cpu"), dtype=torch.float32, backend="torch", block_size=block_size,
        num_kv_blocks=num_blocks, max_model_len=4096, max_num_seqs=max_num_seqs, max_num_batched_tokens=16384,
    )
    engine = LLMEngine(folder, config)
    runner, hidden = engine.runner, engine.model_config.hidden_size
    # Narrow logits: the argmax over a real vocabulary is device work on a GPU, not host work.
    logits = torch.randn(max_num_seqs * 4, 64)
    runner._forward_eager = lambda step, fed=None: torch.zeros(step.input_ids.shape[0], hidden)
    runner.model.compute_logits = lambda h: logits[: h.shape[0]]
    return engine


def decode_ms(engine: LLMEngine, prompts: list[list[int]], steps: int, profiler: cProfile.Profile | None = None,
              output_kind: OutputKind = OutputKind.FINAL_ONLY) -> float:
    """Median wall time of one decode step with every prompt running (profiled if asked);
    outputs as LLM.generate asks for them unless `output_kind` says otherwise."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True, output_kind=output_kind)
    ids = [f"d{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()
    times = []
    if profiler is not None:
        profiler.enable()
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    if profiler is not None:
        profiler.disable()
    for rid in ids:
        engine.abort_request(rid)
    return float(np.median(times) * 1e3)


def rag_burst(engine: LLMEngine, prompts: list[list[int]]) -> dict:
    """Host time of the whole burst, and what the scheduler did with it. The scheduling does not
    depend on the hardware (same limits, same pool size in blocks as a large GPU gives), so the
    KV use at the peak, counted as bench_gpu.py counts it, is what a GPU run reports."""
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    kv_use = KvUse(engine)
    computed = 0
    schedule = engine.scheduler.schedule

    def counting_schedule():
        nonlocal computed
        out = schedule()
        computed += out.num_tokens
        return out

    engine.scheduler.schedule = counting_schedule
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"rag{i}", p, params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        kv_use()
        steps += 1
    stats = engine.stats()
    return {
        "wall_s": time.perf_counter() - start,
        "steps": steps,
        "kv_use_at_peak": kv_use.use,
        "peak_blocks_used": kv_use.peak_blocks,
        "empty_slots_at_peak": kv_use.empty_slots,
        "prefix_hit_rate": stats.prefix_hit_rate,
        "prompt_tokens": sum(map(len, prompts)),
        "tokens_computed": computed,
    }


def detokenizer_ms(tokenizer_dir: Path, batch: int, steps: int = 128) -> float:
    """One step's detokenisation for `batch` sequences of real text (the README's tokens), best
    of five: the stub's own tokens are a handful of ids, not text."""
    from transformers import AutoTokenizer

    from edgepaged.detokenizer import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.encode((REPO / "README.md").read_text())[:steps]
    best = float("inf")
    for _ in range(5):
        dets = [IncrementalDetokenizer(tokenizer, ids[:6]) for _ in range(batch)]
        t = time.perf_counter()
        for token in ids:
            for det in dets:
                det.add(token)
        best = min(best, (time.perf_counter() - t) / len(ids))
    return best * 1e3


def top_functions(engine: LLMEngine, prompts: list[list[int]], steps: int) -> list[dict]:
    prof = cProfile.Profile()
    decode_ms(engine, prompts, steps, prof)
    rows = [
        {"function": f"{Path(f).name}:{line}({name})", "self_ms": tt * 1e3 / steps, "total_ms": ct * 1e3 / steps}
        for (f, line, name), (_, _, tt, ct, _) in pstats.Stats(prof).stats.items()
    ]
    return sorted(rows, key=lambda r: -r["self_ms"])[:15]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tag", default="", help="appended to the report's file name")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--tokenizer", type=Path, default=REPO / ".carry" / "smollm2-tokenizer",
                        help="tokenizer files written beside the stub model, so outputs are detokenised as in serving")
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = args.tokenizer if (args.tokenizer / "tokenizer.json").is_file() else None
    folder = write_random_model(Path(tempfile.mkdtemp(prefix="edgepaged-host-")), "tiny-llama",
                                vocab_size=49152 if tokenizer else VOCAB, tokenizer_from=tokenizer,
                                hidden_size=32, intermediate_size=32, num_hidden_layers=1)
    largest = max(args.batches)
    prompts = rag_prompts(VOCAB, largest, seed=1)
    engine = stub_engine(folder, args.block_size, largest, num_blocks=largest * 4200 // args.block_size)
    decode_ms(engine, prompts[:8], 5)  # warm-up
    results = {
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "dirty": bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                     capture_output=True, text=True).stdout.strip()),
        "command": " ".join(["python", *sys.argv]),
        "block_size": args.block_size,
        "decode_ms_per_step": {str(b): decode_ms(engine, prompts[:b], args.steps) for b in args.batches},
        "decode_ms_by_output_kind_at_largest": {
            kind.value: decode_ms(engine, prompts[:largest], args.steps, output_kind=kind) for kind in OutputKind
        },
        "detokenizer_ms_per_step_at_largest": detokenizer_ms(tokenizer, largest) if tokenizer else None,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "profile_at_largest": top_functions(engine, prompts[:largest], args.steps),
        "rag_burst": rag_burst(stub_engine(folder, args.block_size, largest, largest * 4200 // args.block_size), prompts),
    }
    stem = args.out_dir / f"host-{results['machine'].lower()}-{results['date']}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(stem.with_suffix(".md").read_text())


def markdown(r: dict) -> str:
    lines = [
        f"# Host cost of an engine step: {r['machine']}, {r['date']}",
        "",
        f"Command: `{r['command']}` at commit {r['commit']}{' (with uncommitted changes)' if r['dirty'] else ''}; "
        f"block size {r['block_size']}; the model is a stub (no forward pass), so this is the engine's own work.",
        "",
        "| batch | host ms per decode step | per sequence (us) |",
        "|---:|---:|---:|",
    ]
    for b, ms in r["decode_ms_per_step"].items():
        lines.append(f"| {b} | {ms:.3f} | {ms * 1e3 / int(b):.1f} |")
    largest = max(map(int, r["decode_ms_per_step"]))
    lines += ["", f"Outputs at batch {largest} (the table above: final_only, what LLM.generate asks for; a streaming "
              f"server asks for delta): " + ", ".join(f"{k} {v:.3f} ms" for k, v in r["decode_ms_by_output_kind_at_largest"].items())
              + f". Tokenizer: {r['tokenizer'] or 'none (no detokenisation)'}."]
    if r["detokenizer_ms_per_step_at_largest"] is not None:
        lines += ["", f"Detokenising one token of real text for each of {largest} sequences: "
                  f"{r['detokenizer_ms_per_step_at_largest']:.3f} ms (best of five)."]
    burst = r["rag_burst"]
    lines += [
        "",
        f"RAG burst ({max(map(int, r['decode_ms_per_step']))} requests, 1,024 shared + 64-512 own prompt tokens, "
        f"{OUTPUT_TOKENS} output tokens): {burst['wall_s']:.2f} s of host work over {burst['steps']} steps. "
        f"The scheduler computed {burst['tokens_computed']:,} tokens for {burst['prompt_tokens']:,} prompt tokens "
        f"(prefix hit rate {burst['prefix_hit_rate']:.1%}); KV use at the peak ({burst['peak_blocks_used']:,} blocks): "
        f"**{burst['kv_use_at_peak']:.2%}** ({burst['empty_slots_at_peak']:,} empty slots). These do not depend on the "
        "hardware: a GPU run of the same workload under the same limits schedules the same steps.",
        "",
        "cProfile at the largest batch (ms per step; the profiler itself inflates these):",
        "",
        "| function | self ms | total ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{p['function']}` | {p['self_ms']:.3f} | {p['total_ms']:.3f} |" for p in r["profile_at_largest"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The step loop on a GPU: shared-prompt bursts, the host's cost per step, overlap on and off.

Writes docs/benchmarks/steploop-<card>-<date>.md and .json. In one run, on random bf16 weights
of the SmolLM2-135M and Llama-3.2-1B shapes (bench_gpu.py's checkpoints):
  1. `pps`: bench_gpu.py's workload of N requests sharing one 1,024-token prompt, 128 greedy
     tokens each, N = 1, 16, 64, 256, identical and with 16 distinct trailing tokens, with
     overlapped steps and without. `llama-batched-bench -npp 1024 -ntg 128 -pps` runs beside it
     when --llama-cpp names its build folder (the model converted to a bf16 GGUF in this run).
  2. `host`: steady decode at 4, 64 and 256 running sequences (each 1,024 shared + 64 own
     prompt tokens), prefix caching on and off, outputs as LLM.generate asks for them (and, at
     256, as a streaming server does): wall time per step, and the host's own time in
     schedule, execute (building and launching the step), waiting for tokens and updating from
     them; the GPU's busy time per step from torch.profiler.
  3. `rag`: bench_gpu.py's RAG burst (256 requests, 1,024 shared + 64-512 own tokens, 128 out)
     with overlapped steps and without: output tok/s, TTFT p50/p99.
  4. `batch1`: one sequence's decode tok/s (graphs), overlapped and not.

    python scripts/bench_step_loop.py --models-dir /tmp/m [--models smollm2-135m] [--llama-cpp DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_gpu import OUTPUT_TOKENS, PPS_N, PPS_OUT, PPS_PROMPT, pps, profile_steps, rag_prompts, run_requests
from run_report import card_slug, gpu_run_facts

REPO = Path(__file__).resolve().parent.parent
SHAPES = ("smollm2-135m", "llama-3.2-1b")
HOST_BATCHES = (4, 64, 256)
# The issue's goals for the H200 (2026-12-01 figures: llama.cpp 1.48 s and 1.80 s at N=256).
PPS_GOAL_S = {"smollm2-135m": 0.74, "llama-3.2-1b": 0.9}


def model_folder(models_dir: Path, shape: str, tokenizer: Path | None) -> Path:
    """The shape's random bf16 checkpoint with SmolLM2's vocabulary (49,152) and tokenizer, so
    llama.cpp's converter reads it too (the 2026-12-01 peer figures used the same)."""
    from edgepaged.models.random_init import write_random_model

    folder = models_dir / f"{shape}-v49152"
    if not (folder / "config.json").is_file():
        write_random_model(folder, shape, vocab_size=49152, tokenizer_from=tokenizer, dtype=torch.bfloat16,
                           eos_token_id=None, bos_token_id=None, std=0.02)
    return folder


def set_overlap(engine, on: bool) -> None:
    engine.pipeline.overlap = on


class StepTimer:
    """Host seconds in each part of a step, by wrapping the engine's own calls."""

    def __init__(self, engine):
        import edgepaged.overlap as overlap

        self.parts = {"schedule": 0.0, "execute": 0.0, "wait_tokens": 0.0, "update": 0.0}
        pipeline = engine.pipeline
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(pipeline.runner, "execute", "execute")
        self._wrap(engine, "_update_from_output", "update")
        original = overlap._ToHost.values
        timer = self

        def values(host):
            t = time.perf_counter()
            try:
                return original(host)
            finally:
                timer.parts["wait_tokens"] += time.perf_counter() - t

        overlap._ToHost.values = values
        self._restore = lambda: setattr(overlap._ToHost, "values", original)

    def _wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] += time.perf_counter() - t

        setattr(obj, name, timed)

    def reset(self) -> None:
        for k in self.parts:
            self.parts[k] = 0.0

    def close(self, engine) -> None:
        self._restore()
        for obj, name in ((engine.scheduler, "schedule"), (engine.pipeline.runner, "execute"), (engine, "_update_from_output")):
            del obj.__dict__[name]


def host_cost(engine, vocab: int) -> list[dict]:
    """Every row with the outputs LLM.generate asks for (FINAL_ONLY); at 256 sequences with
    overlap and caching on, also with those a streaming server asks for (DELTA) and CUMULATIVE."""
    from edgepaged import OutputKind, SamplingParams

    rows = []
    rng = np.random.default_rng(5)
    shared = rng.integers(1, vocab, 1024).tolist()
    cases = [(caching, overlap, batch, OutputKind.FINAL_ONLY)
             for caching in (True, False) for overlap in (True, False) for batch in HOST_BATCHES]
    cases += [(True, True, HOST_BATCHES[-1], kind) for kind in (OutputKind.DELTA, OutputKind.CUMULATIVE)]
    for caching, overlap, batch, kind in cases:
        engine.kv.pool.enable_caching = caching
        set_overlap(engine, overlap)
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, output_kind=kind)
        ids = [f"h{caching}{overlap}{batch}{kind.value}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, shared + rng.integers(1, vocab, 64).tolist(), params)
        while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
            engine.step()
        for _ in range(5):
            engine.step()
        timer = StepTimer(engine)
        steps = 60
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
        parts = {k: v / steps * 1e3 for k, v in timer.parts.items()}
        timer.close(engine)
        prof = profile_steps(engine, 10)
        for rid in ids:
            engine.abort_request(rid)
        while engine.pipeline.in_flight is not None:
            engine.step()
        host = wall * 1e3 - parts["wait_tokens"]
        rows.append({"prefix_caching": caching, "overlap": overlap, "batch": batch, "outputs": kind.value,
                     "wall_ms_per_step": wall * 1e3, "host_ms_per_step": host,
                     **{f"{k}_ms": v for k, v in parts.items()},
                     "gpu_busy_ms_per_step": prof["gpu_busy_ms_per_step"],
                     "gpu_busy_fraction": prof["gpu_busy_ms_per_step"] / (wall * 1e3)})
        print(f"  host caching={caching} overlap={overlap} batch={batch} {kind.value}: {wall * 1e3:.2f} ms/step, host "
              f"{host:.2f} ms ({', '.join(f'{k} {v:.2f}' for k, v in parts.items())}), GPU busy "
              f"{prof['gpu_busy_ms_per_step']:.2f} ms", flush=True)
    engine.kv.pool.enable_caching = True
    return rows


def freeze_startup_heap() -> None:
    """A full garbage collection walks every object torch, transformers and the model made (120
    ms on a 2-core box) and would land inside whichever step of a burst triggers it; frozen, that
    heap is never walked again. Undone (gc.unfreeze) before the engine is dropped: its reference
    cycles, KV pool included, must stay collectable."""
    gc.collect()
    gc.freeze()


STARTUP_COMPILES: list[str] = []  # what the engine compiled while it was built (warm-up included)


class TritonCompiles:
    """The Triton kernels compiled while the block runs: after warm-up, each is a first-use
    cost that lands on some request's latency."""

    def __enter__(self):
        from triton import knobs

        self.names: list[str] = []
        self._previous = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self._record
        return self

    def _record(self, *args, **kwargs):
        # The repr names the kernel and its launch options; the key holds each argument's
        # specialisation (dtype, alignment, value 1), which is what tells two variants apart.
        name = str(kwargs.get("repr", kwargs.get("fn", "?"))).split("(", 1)[0]
        self.names.append(f"{name} key={kwargs.get('key')!r}")
        return False

    def __exit__(self, *exc):
        from triton import knobs

        knobs.runtime.jit_post_compile_hook = self._previous


class GcPauses:
    """Python's garbage collections while the block runs, per generation: a collection lands
    inside whichever step allocates the object that triggers it, on some request's latency."""

    def __enter__(self):
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t = 0.0
        gc.callbacks.append(self._note)
        return self

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._t)

    def __exit__(self, *exc):
        gc.callbacks.remove(self._note)

    def summary(self) -> dict:
        return {f"gen{g}": {"count": len(v), "ms": round(1e3 * sum(v), 2), "max_ms": round(1e3 * max(v, default=0), 2)}
                for g, v in self.pauses.items()}


RAG_ROUNDS = 4


def rag_burst(engine, vocab: int) -> list[dict]:
    """The burst RAG_ROUNDS times in each mode, the mode going first alternating by round (a
    mode always going first or second met different allocator and heap states)."""
    rows = []
    prompts = rag_prompts(vocab, 256, seed=1)
    for rnd in range(RAG_ROUNDS):
        for overlap in (True, False) if rnd % 2 == 0 else (False, True):
            set_overlap(engine, overlap)
            engine.kv.pool.reset_cache()
            trace = []  # per step: time, waiting, running
            timer = StepTimer(engine)
            with TritonCompiles() as compiles, GcPauses() as gcs:
                r = run_requests(engine, prompts, OUTPUT_TOKENS, on_step=lambda: trace.append(
                    (time.monotonic(), len(engine.scheduler.waiting), len(engine.scheduler.running))))
            timer.close(engine)
            r["host_s"] = dict(timer.parts)
            r["triton_compiles"] = compiles.names
            r["gc"] = gcs.summary()
            steps_s = np.diff([r_start for r_start, _, _ in trace]) if len(trace) > 1 else np.zeros(1)
            r["slowest_steps_s"] = sorted(steps_s.tolist(), reverse=True)[:5]
            for name in compiles.names:
                kernel = name.split("[", 1)[0]
                seen = [n for n in STARTUP_COMPILES if n.startswith(kernel + "[")]
                print(f"  rag round {rnd}: Triton compiled during the burst: {name}\n    compiled at start-up "
                      f"({len(seen)}): " + "\n    ".join(seen[:4]), flush=True)
            admitted = next((i for i, (_, w, _) in enumerate(trace) if w == 0), len(trace))
            r |= {"steps": len(trace), "steps_until_all_admitted": admitted + 1,
                  "s_until_all_admitted": trace[min(admitted, len(trace) - 1)][0] - trace[0][0] if trace else 0.0,
                  "waiting_after_steps": [w for _, w, _ in trace[:12]]}
            rows.append({"round": rnd, "overlap": overlap, **r})
            print(f"  rag overlap={overlap}: {r['output_tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_s']:.3f} s "
                  f"p99 {r['ttft_p99_s']:.3f} s, wall {r['wall_s']:.2f} s, {r['steps']} steps, all admitted after "
                  f"{r['steps_until_all_admitted']} ({r['s_until_all_admitted']:.3f} s); waiting {r['waiting_after_steps']}; "
                  f"host s: {', '.join(f'{k} {v:.3f}' for k, v in r['host_s'].items())}; gc {r['gc']}", flush=True)
    for overlap in (True, False):
        mine = [g for g in rows if g["overlap"] is overlap]
        print(f"  rag overlap={overlap}, median of {len(mine)} rounds: "
              f"{np.median([g['output_tok_s'] for g in mine]):.0f} tok/s, "
              f"TTFT p50 {np.median([g['ttft_p50_s'] for g in mine]):.3f} s", flush=True)
    return rows


def host_syncs(engine, vocab: int) -> dict:
    """Where the host waits for the GPU outside the token landing: a RAG burst of 32 requests
    under torch's sync debug mode, which warns at every synchronising call (landing's own
    event wait is not one of them)."""
    import traceback
    import warnings

    prompts = rag_prompts(vocab, 32, seed=3)
    sites: dict[str, int] = {}
    set_overlap(engine, True)
    original = warnings.showwarning

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "edgepaged" in f.filename or "kernels" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1]) or f"{filename}:{lineno}"
        key = f"{str(message)[:80]} at {where}"
        sites[key] = sites.get(key, 0) + 1

    warnings.showwarning = note
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            r = run_requests(engine, prompts, 16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
    for key, n in sorted(sites.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  sync x{n}: {key}", flush=True)
    return {"requests": r["requests"], "sites": sites}


def batch1(engine, vocab: int) -> dict:
    from edgepaged import SamplingParams

    prompt = np.random.default_rng(7).integers(1, vocab, 128).tolist()
    out = {}
    for overlap in (True, False, True, False):
        set_overlap(engine, overlap)
        engine.add_request(f"b1-{overlap}-{len(out)}", prompt, SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True))
        times = []
        while engine.has_unfinished_requests():
            engine.step()
            times.append(time.perf_counter())
        rate = (len(times) - 2) / (times[-1] - times[1])
        key = f"overlap_{'on' if overlap else 'off'}_tok_s"
        out[key] = max(out.get(key, 0.0), rate)  # best of two: the first pass warms up
    print(f"  batch1: {out}", flush=True)
    return out


def llama_cpp_pps(bin_dir: Path, folder: Path, work: Path) -> dict:
    """llama-batched-bench -pps on the same shape, converted to a bf16 GGUF here."""
    src = bin_dir.parent.parent
    gguf = work / f"{folder.name}-bf16.gguf"
    if not gguf.exists():
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "bf16", "--outfile", str(gguf)],
                       check=True, capture_output=True, env={"PYTHONPATH": str(src / "gguf-py"), "PATH": "/usr/bin:/bin"})
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-ngl", "99", "-fa", "on", "-c", "300000", "-b", "2048",
           "-ub", "512", "-npp", str(PPS_PROMPT), "-ntg", str(PPS_OUT), "-npl", ",".join(map(str, PPS_N)), "-pps"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    rows = []
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            pp, tg, b, n_kv, t_pp, s_pp, t_tg, s_tg, t, s = cells[:10]
            rows.append({"n": int(b), "t_pp_s": float(t_pp), "t_tg_s": float(t_tg), "wall_s": float(t),
                         "tg_tok_s": float(s_tg), "tok_s": float(s)})
    return {"command": " ".join(cmd), "rows": rows, "stderr_tail": proc.stderr[-600:] if not rows else ""}


def markdown(results: dict) -> str:
    lines = [f"# The step loop on {results['device']} ({results['date'][:10]})", "",
             f"Command: `{results['command']}`; torch {results['torch']}, triton {results['triton']}; profile "
             f"`{results['profile']}`; random bf16 weights. Made by scripts/bench_step_loop.py.", ""]
    for shape, r in results["models"].items():
        lines += [f"## {shape}", ""]
        if "pps" in r:
            peer = {row["n"]: row for row in r.get("llama_cpp", {}).get("rows", [])}
            lines += ["### N requests sharing a 1,024-token prompt, 128 tokens each", "",
                      "| overlap | N | prompts | all first tokens (s) | whole run (s) | output tok/s | steps | llama.cpp whole run (s) | ratio |",
                      "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
            for row in r["pps"]:
                p = peer.get(row["n"])
                ratio = f"{p['wall_s'] / row['wall_s']:.2f}x" if p and row["prompts"] == "identical" else ""
                lines.append(f"| {'on' if row['overlap'] else 'off'} | {row['n']} | {row['prompts']} | {row['all_first_tokens_s']:.3f} | "
                             f"{row['wall_s']:.3f} | {row['output_tok_s']:,.0f} | {row['steps']} | "
                             f"{p['wall_s']:.3f} | {ratio} |" if p else
                             f"| {'on' if row['overlap'] else 'off'} | {row['n']} | {row['prompts']} | {row['all_first_tokens_s']:.3f} | "
                             f"{row['wall_s']:.3f} | {row['output_tok_s']:,.0f} | {row['steps']} | | |")
            lines.append("")
            if r.get("llama_cpp", {}).get("command"):
                lines += [f"llama.cpp: `{r['llama_cpp']['command']}`", ""]
        if "host" in r:
            lines += ["### The host's time per decode step (ms)", "",
                      "| prefix caching | overlap | running | outputs | wall | host | schedule | execute | wait for tokens | update | GPU busy | GPU busy share |",
                      "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for h in r["host"]:
                lines.append(f"| {'on' if h['prefix_caching'] else 'off'} | {'on' if h['overlap'] else 'off'} | {h['batch']} | {h['outputs']} | "
                             f"{h['wall_ms_per_step']:.2f} | {h['host_ms_per_step']:.2f} | {h['schedule_ms']:.2f} | "
                             f"{h['execute_ms']:.2f} | {h['wait_tokens_ms']:.2f} | {h['update_ms']:.2f} | "
                             f"{h['gpu_busy_ms_per_step']:.2f} | {h['gpu_busy_fraction']:.0%} |")
            lines.append("")
        if "rag" in r:
            lines += ["### RAG burst (256 requests, 1,024 shared + 64-512 own tokens, 128 out)", "",
                      "| round | overlap | output tok/s | TTFT p50 (s) | TTFT p99 (s) | wall (s) | all admitted (s) | GC pauses (ms, gen 0/1/2) |",
                      "|---:|---|---:|---:|---:|---:|---:|---|"]
            for g in r["rag"]:
                pauses = "/".join(f"{g['gc'][k]['ms']:.1f}" for k in ("gen0", "gen1", "gen2")) if "gc" in g else ""
                lines.append(f"| {g['round']} | {'on' if g['overlap'] else 'off'} | {g['output_tok_s']:,.0f} | {g['ttft_p50_s']:.3f} | "
                             f"{g['ttft_p99_s']:.3f} | {g['wall_s']:.2f} | {g['s_until_all_admitted']:.3f} | {pauses} |")
            for overlap in (True, False):
                mine = [g for g in r["rag"] if g["overlap"] is overlap]
                lines.append(f"| median | {'on' if overlap else 'off'} | {np.median([g['output_tok_s'] for g in mine]):,.0f} | "
                             f"{np.median([g['ttft_p50_s'] for g in mine]):.3f} | {np.median([g['ttft_p99_s'] for g in mine]):.3f} | | | |")
            lines.append("")
        if "batch1" in r:
            lines += [f"Batch-1 decode: {', '.join(f'{k} {v:,.0f}' for k, v in r['batch1'].items())}.", ""]
        for part in ("pps", "host", "rag", "batch1", "llama_cpp"):
            if isinstance(r.get(part), dict) and r[part].get("error"):
                lines += [f"{part} failed: ```{r[part]['error'][-800:]}```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=REPO / ".carry" / "smollm2-tokenizer",
                        help="SmolLM2's tokenizer files, written beside the random weights")
    parser.add_argument("--parts", nargs="+", default=["rag", "pps", "host", "batch1", "syncs"])
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's build/bin folder: run llama-batched-bench beside")
    parser.add_argument("--llama-cpp-wait-s", type=float, default=0, help="how long to wait for its build")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    from edgepaged.engine import LLMEngine

    facts = gpu_run_facts()
    profile = "h200-141gb" if "H200" in facts["device"] else "h100-80gb"
    results = {**facts, "profile": profile, "models": {}}
    stem = args.out_dir / f"steploop-{card_slug(facts['device'])}-{facts['date'][:10]}{'-' + args.tag if args.tag else ''}"

    def save() -> None:
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))

    for shape in args.models:
        folder = model_folder(args.models_dir, shape, args.tokenizer if args.tokenizer.is_dir() else None)
        entry = results["models"].setdefault(shape, {})
        with TritonCompiles() as startup:
            engine = LLMEngine.from_model(folder, profile=profile, backend="triton")
        STARTUP_COMPILES[:] = startup.names
        freeze_startup_heap()
        vocab = engine.model_config.vocab_size
        for part in args.parts:
            print(f"[{shape}] {part}", flush=True)
            try:
                entry[part] = {"pps": pps, "host": host_cost, "rag": rag_burst, "batch1": batch1, "syncs": host_syncs}[part](engine, vocab)
            except Exception as exc:  # a part's failure is reported; the others still run
                import traceback

                entry[part] = {"error": f"{exc!r}\n{traceback.format_exc()[-2000:]}"}
                for rid in list(engine.requests):
                    engine.abort_request(rid)
            save()
        del engine
        gc.unfreeze()  # the dropped engine's cycles (its KV pool among them) become collectable
        gc.collect()
        torch.cuda.empty_cache()
    # The peer last: its build (scripts/gpu_session.sh starts it in the background) may finish
    # while the engine runs.
    binary = args.llama_cpp / "llama-batched-bench" if args.llama_cpp else None
    deadline = time.monotonic() + args.llama_cpp_wait_s
    while binary is not None and not binary.exists() and time.monotonic() < deadline:
        time.sleep(5)
    for shape in args.models if binary is not None and binary.exists() else []:
        print(f"[{shape}] llama.cpp", flush=True)
        folder = model_folder(args.models_dir, shape, None)
        try:
            results["models"][shape]["llama_cpp"] = llama_cpp_pps(args.llama_cpp, folder, args.models_dir)
        except Exception as exc:
            results["models"][shape]["llama_cpp"] = {"error": repr(exc)}
        save()
    save()
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()

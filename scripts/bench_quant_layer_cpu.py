"""Microbenchmark: one decoder layer's matrices in each GGUF block type on the CPU.

Times `cpu_weight(...).linear` (edgepaged/quant/cpu.py, the form the CPU engine runs) of the
matrices of one Llama-3.2-1B layer (fused qkv, o, fused gate_up, down), each as Q4_K, Q6_K, Q8_0
and float32, for 1 and 16 tokens: where a block type's CPU path is slow shows here without a
model around it. Random blocks (tests/gguf_models.py draws K-quant bytes with sane scales).

    python scripts/bench_quant_layer_cpu.py [--threads 1] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_models import gguf_bytes  # noqa: E402

from edgepaged.quant.cpu import cpu_weight  # noqa: E402
from edgepaged.quant.gguf import REPACKERS  # noqa: E402

LAYER = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)]
KINDS = ["Q4_K", "Q6_K", "Q8_0", "F32"]


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}; ms per linear call")
    print("| matrix | N x K | tokens | " + " | ".join(KINDS) + " |")
    print("| --- | --- | --- |" + " --- |" * len(KINDS))
    for name, n, k in LAYER:
        dense = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        weights = {kind: cpu_weight(REPACKERS[kind](gguf_bytes(kind, dense, rng)), torch.float32) for kind in KINDS[:-1]}
        weights["F32"] = torch.from_numpy(dense)
        for tokens in (1, 16):
            x = torch.randn(tokens, k)
            cells = []
            for kind in KINDS:
                w = weights[kind]
                run = (lambda w=w: x @ w.T) if kind == "F32" else (lambda w=w: w.linear(x))
                cells.append(f"{_ms(run, args.repeats):.2f}")
            print(f"| {name} | {n} x {k} | {tokens} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

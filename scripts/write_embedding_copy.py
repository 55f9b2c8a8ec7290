"""Write an fp16 copy of the embedding model for a machine that cannot install it, and check it.

The packaged all-MiniLM-L6-v2 is 90 MB of float32 weights, more than a device call may carry
beside the rest of the tree (64 MiB in all). Stored in float16 it is about 45 MB; the Embedder
computes in float32 after loading, so only the weights' rounding changes the vectors. This
script writes the copy, then embeds a few sentences with both and refuses (exit 1) a copy
whose vectors point elsewhere (cosine below --min-cosine), so a bad copy never travels.

    python3 scripts/write_embedding_copy.py .carry/minilm-fp16
    EDGEPAGED_EMBEDDING_MODEL=.carry/minilm-fp16 edgepaged rag ask ...   # or --embedding-model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edgepaged.rag.embed import Embedder, write_half_precision_copy

# Short and long, prose and code-like: the texts retrieval embeds (questions and passages).
SAMPLES = (
    "What does json.dumps do?",
    "Which heapq function would I use to push item onto heap, maintaining the heap invariant?",
    (
        "## shutil.copytree(src, dst, symlinks=False)\n\nRecursively copy a directory tree and return the "
        "destination directory. If exception(s) occur, an Error is raised with a list of reasons."
    ),
    "Hold the MODE and SET buttons together for ten seconds to restore the factory settings.",
    "tempfile.mkdtemp: user-callable function to create and return a unique temporary directory. " * 8,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to write (e.g. .carry/minilm-fp16)")
    parser.add_argument("--source", type=Path, default=None, help="model folder (default: the packaged model)")
    parser.add_argument("--min-cosine", type=float, default=0.999)
    args = parser.parse_args()

    original = Embedder(args.source)
    out = write_half_precision_copy(args.dest, original.path)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    cosine = np.sum(original.embed(SAMPLES) * Embedder(out).embed(SAMPLES), axis=1)
    print(f"wrote {out} ({size / 2**20:.1f} MiB); cosine to {original.name}: min {cosine.min():.6f}")
    if cosine.min() < args.min_cosine:
        print(f"error: the copy's vectors differ (cosine {cosine.min():.6f} < {args.min_cosine})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

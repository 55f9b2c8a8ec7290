"""CUDA graphs for decode steps, and the one host-to-device transfer every step makes.

A decode step of a small model is a thousand tiny kernels; launched one by one from Python the
GPU waits on the host most of the time. A graph replays the whole forward pass with one launch.
Graphs freeze shapes and addresses, so decode steps (one token per sequence) are captured for a
few batch sizes and a live batch runs in the smallest one that holds it, the spare rows padded
(slot -1: nothing written; context 0: nothing read). The inputs live in static device buffers
that each step fills with one copy from pinned memory. The attention plan is captured for the
longest context the engine allows; the decode kernel cuts each sequence's context for its own
length (see `kernels.paged_decode._split_len`), so one graph per batch size is as fast at a short
context as an eager step planned for it. Prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .attention import AttentionBackend, AttentionBatch

GRAPHS_ENV = "EDGEPAGED_CUDA_GRAPHS"

_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}
# Every staged array starts where a fresh allocation would: kernels and external executors
# (TensorRT binds tensors by address) may rely on that alignment.
_ALIGN = 256


def stage(arrays: Sequence[np.ndarray], device: torch.device, out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Move int32/int64 host arrays to `device` in one transfer; one device view per array.

    The arrays are packed (256-byte aligned) into one pinned buffer and copied without blocking
    the host; the caching host allocator keeps the buffer alive until the copy has run. `out`
    (a uint8 device buffer) receives the bytes instead of a fresh allocation: the same array
    shapes then always land at the same addresses, which is what a captured graph reads. On the
    CPU without `out` the packed buffer itself is returned, with no copy.
    """
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    packed = host.numpy()
    for a, offset in zip(arrays, offsets):
        packed[offset : offset + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if out is None and device.type == "cpu":
        dev = host
    else:
        dev = torch.empty(total, dtype=torch.uint8, device=device) if out is None else out[:total]
        dev.copy_(host, non_blocking=True)
    return [
        dev[offset : offset + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
        for a, offset in zip(arrays, offsets)
    ]


@dataclass(slots=True)
class FedRows:
    """Token rows of a step whose ids are still on the device, sampled by the step before (see
    overlap.py): the arrays travel with the step's other inputs."""

    tokens: torch.Tensor
    rows: np.ndarray  # int64: token rows of the step
    src: np.ndarray  # int64: their tokens' indices in `tokens`

    def fill(self, input_ids: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
        """input_ids[rows] = tokens[src] with the staged copies of `rows` and `src`, on the
        device, in stream order after the sampler that made `tokens`."""
        input_ids.index_copy_(0, rows, self.tokens.index_select(0, src))


def graphs_requested(flag: bool | None) -> bool:
    """An explicit flag wins; otherwise EDGEPAGED_CUDA_GRAPHS=0 turns graphs off (default on)."""
    if flag is not None:
        return flag
    return os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, ending at max_num_seqs: a batch pads at most 7 rows."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [batch, hidden]: the graph's output, rewritten by every replay
    prepared: Any  # the backend's per-step state (split plan and its scratch), kept alive


class DecodeGraphs:
    """One captured decode step per batch size, over one KV pool.

    Built after the pool is allocated (graphs hold its address); `memory_bytes` is the device
    memory capture took (graph pool, library workspaces), for the memory report. Not thread-safe:
    one engine thread replays.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
    ):
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = kv_caches[0][0].device
        self.sizes = graph_batch_sizes(max_num_seqs)
        largest, width = self.sizes[-1], -(-max_model_len // block_size)
        # Per row: token id, position and slot (int64) and context length (int32); then room for
        # a step's block tables packed to their own width, and for a token feed's rows and
        # sources (int64 each); each of the seven arrays aligned.
        capacity = largest * (44 + 4 * width) + 7 * _ALIGN
        self.inputs = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self.block_tables = torch.zeros(largest, width, dtype=torch.int32, device=self.device)
        self.graphs: dict[int, _Graph] = {}
        self.memory_bytes = 0
        self.capture_seconds = 0.0
        self.replays = 0

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so the smaller ones reuse its pool memory."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # so the free-memory difference counts what capture keeps
        free_before, _ = torch.cuda.mem_get_info(self.device)
        pool = torch.cuda.graph_pool_handle()
        # Warm-up and capture share one stream, so per-stream library state (cuBLAS workspaces)
        # is set up by the warm-up rather than allocated mid-capture.
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            padding = [_padded(np.zeros(0), size, dtype, fill) for dtype, fill in _INPUTS]
            # The layout of the static buffer depends only on the batch size, so a replay finds
            # its inputs where they were at capture.
            ids, positions, slots, context_lens = stage(
                [*padding, np.zeros((size, 1), np.int32)], self.device, out=self.inputs
            )[:4]
            batch = AttentionBatch(
                slot_mapping=slots,
                num_decode_tokens=size,
                decode_block_tables=self.block_tables[:size],
                decode_context_lens=context_lens,
                max_decode_context_len=self.max_model_len,
                prefill_block_tables=self.block_tables[:0],
                prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=self.device),
                prefill_context_lens=context_lens[:0],
                max_prefill_query_len=0,
                max_prefill_context_len=0,
                block_size=self.block_size,
            )
            prepared = self.backend.prepare(batch)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                # Every row is padding (slot -1, context 0): the warm-up compiles kernels and
                # picks GEMM algorithms outside the capture without touching the KV pool.
                self.model(ids, positions, self.kv_caches, prepared)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden = self.model(ids, positions, self.kv_caches, prepared)
            self.graphs[size] = _Graph(graph, hidden, prepared)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' activations are cached, not kept
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.memory_bytes = max(free_before - free_after, 0)
        self.capture_seconds = time.perf_counter() - start

    def size_for(self, num_seqs: int) -> int | None:
        """The smallest captured batch size holding `num_seqs` rows (None: too many, run eagerly)."""
        if num_seqs > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        context_lens: np.ndarray,
        block_tables: np.ndarray,
        fed: FedRows | None = None,
    ) -> torch.Tensor:
        """Replay the decode step for these rows (one token each); hidden states [rows, hidden].

        `fed` fills the input ids of rows whose token is still on the device. The result is a
        view of the graph's output: read it before the next replay.
        """
        n = input_ids.shape[0]
        size = self.size_for(n)
        assert size is not None, f"{n} rows exceed the largest captured batch {self.sizes[-1]}"
        rows = (input_ids, positions, slot_mapping, context_lens)
        padded = [_padded(a, size, dtype, fill) for a, (dtype, fill) in zip(rows, _INPUTS)]
        extra = [fed.rows, fed.src] if fed is not None else []
        views = stage([*padded, block_tables, *extra], self.device, out=self.inputs)
        if fed is not None:
            fed.fill(views[0], views[5], views[6])
        # The tables travel packed to this step's width; the graph reads them at full width.
        self.block_tables[:n, : block_tables.shape[1]].copy_(views[4])
        entry = self.graphs[size]
        entry.graph.replay()
        self.replays += 1
        return entry.hidden[:n]



# The graph inputs per row, in staging order, and the value a padded row carries.
_INPUTS = ((np.int64, 0), (np.int64, 0), (np.int64, -1), (np.int32, 0))  # ids, positions, slots, context lens


def _padded(a: np.ndarray, size: int, dtype: type, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=dtype)
    out[: a.shape[0]] = a
    return out

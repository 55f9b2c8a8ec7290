"""Turns a scheduler step into one forward pass over the paged KV cache, and back into logits.

The runner owns the KV tensors (allocated once, never grown) and the translation from
sequences and block tables to flat tensors; the model and backend never see a Sequence.
On a GPU the host side of a step is on the critical path (the engine waits for each step's
tokens), so inputs are built with numpy from block tables mirrored across steps and reach the
device in one non-blocking copy; nothing here waits for the device. Steps of one-token chunks
(and chunks of up to GRAPH_MAX_CHUNK tokens) replay a CUDA graph when the backend allows it
(see cuda_graph.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .attention import KV_SCALE_DTYPE, AttentionBackend, AttentionBatch, QuantizedCache
from .cache import KVCacheManager
from .config import DecodeFusions
from .cuda_graph import DecodeGraphs, FedRows, graphs_requested, stage
from .models.llama import LlamaForCausalLM
from .scheduler import ScheduledChunk, SchedulerOutput

# Backends whose decode step has static shapes and never reads device values on the host.
_GRAPH_BACKENDS = ("triton",)
# Chunks up to this many tokens run in the decode graphs, one row per token (see HostStep.token_rows):
# re-reading the context once per token costs far less than launching the step eagerly, which
# is what a prompt whose prefix is cached needs for its short tail.
GRAPH_MAX_CHUNK = 16


@dataclass(slots=True)
class StepResult:
    """Logits for the chunks that reached their sequence's end, in `sampled` order: one row
    each, 1 + its drafts for a chunk with drafts; or (a one-row greedy step, see
    LlamaForCausalLM.greedy_tokens) its token instead."""

    logits: torch.Tensor | None
    sampled: list[ScheduledChunk]
    tokens: torch.Tensor | None = None


@dataclass(slots=True)
class HostStep:
    """One step's inputs on the host, decode rows first, in the layout of `AttentionBatch`."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    context_lens: np.ndarray  # int32 [S]: keys each sequence sees after this step
    query_lens: np.ndarray  # int32 [S]
    block_tables: np.ndarray  # int32 [S, W]
    sample_rows: np.ndarray  # int64 [R]: token rows whose logits are sampled (a sequence's in order)
    num_decode: int  # leading sequences with a one-token chunk

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max())

    @property
    def samples_every_row(self) -> bool:
        return self.sample_rows.shape[0] == self.input_ids.shape[0]

    def token_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Context lengths and block tables with one row per token, for the decode kernel.

        A token whose context ends at its own position, attending through its sequence's table
        once this step's K/V is written, is exactly causal attention within its chunk.
        """
        if self.num_decode == self.query_lens.shape[0]:
            return self.context_lens, self.block_tables
        token_seq = np.repeat(np.arange(self.query_lens.shape[0]), self.query_lens)
        return (self.positions + 1).astype(np.int32), self.block_tables[token_seq]


def host_step(
    input_ids: np.ndarray,
    computed: np.ndarray,
    query_lens: np.ndarray,
    block_tables: np.ndarray,
    sampled: np.ndarray,
    block_size: int,
) -> HostStep:
    """Positions, slots and context lengths for chunks of `query_lens` tokens after `computed`
    cached ones; one-token chunks must come first. `sampled[s]` is how many of sequence s's last
    rows are sampled: 0, 1, or 1 + its drafts for a speculative verify. Vectorised: a handful
    of numpy calls per step whatever the batch."""
    num_seqs = query_lens.shape[0]
    ends = np.cumsum(query_lens)
    longer = np.flatnonzero(query_lens != 1)
    num_decode = int(longer[0]) if longer.shape[0] else num_seqs
    if num_decode == num_seqs:
        positions = computed.astype(np.int64)
        token_seq = np.arange(num_seqs)
    else:
        token_seq = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(ends[-1], dtype=np.int64) - np.repeat(ends - query_lens - computed, query_lens)
    block = block_tables[token_seq, positions // block_size].astype(np.int64)
    return HostStep(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=block * block_size + positions % block_size,
        context_lens=(computed + query_lens).astype(np.int32),
        query_lens=query_lens.astype(np.int32),
        block_tables=block_tables,
        sample_rows=_sample_rows(ends, sampled),
        num_decode=num_decode,
    )


def _sample_rows(ends: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    """The token rows of each sequence's last `sampled[s]` tokens, sequence by sequence."""
    if sampled.max(initial=0) <= 1:
        return (ends - 1)[sampled.astype(bool)].astype(np.int64)
    starts = np.repeat(ends - sampled, sampled)
    offsets = np.arange(starts.shape[0]) - np.repeat(np.cumsum(sampled) - sampled, sampled)
    return (starts + offsets).astype(np.int64)


@dataclass(slots=True)
class _Row:
    index: int  # row of _TableMirror.table
    source: list[int]  # the manager's list this row mirrors
    length: int  # entries copied so far


class _TableMirror:
    """The block tables of running sequences as rows of one numpy array, kept across steps.

    Converting every table from its Python list each step costs about a millisecond at 256
    sequences of 100 blocks; tables only grow by appending (see cache/kv_manager.py), so a step
    copies just the new block ids. A row is rebuilt when the manager hands a different list (the
    sequence was preempted and readmitted, or trimmed after rejected drafts) or when the step carries block copies (copy-on-write
    rewrites an entry in place). Rows of sequences absent from a step are reclaimed only when
    the array is full.
    """

    def __init__(self) -> None:
        self.table = np.zeros((64, 64), dtype=np.int32)
        self.rows: dict[int, _Row] = {}
        self.free = list(range(63, -1, -1))

    def gather(self, seq_ids: list[int], kv: KVCacheManager, rebuild: bool) -> np.ndarray:
        """The step's block tables [len(seq_ids), longest]; entries past a table's end are stale."""
        index = np.empty(len(seq_ids), dtype=np.int64)
        width = 1
        for i, seq_id in enumerate(seq_ids):
            ids = kv.block_ids(seq_id)
            row = self.rows.get(seq_id)
            if row is None or row.source is not ids or rebuild:
                row = self._claim(seq_id, ids, seq_ids)
            n = len(ids)
            if n > row.length:
                if n > self.table.shape[1]:
                    self._resize(self.table.shape[0], max(n, 2 * self.table.shape[1]))
                self.table[row.index, row.length : n] = ids[row.length :]
                row.length = n
            index[i] = row.index
            width = max(width, n)
        return self.table[index, :width]

    def _claim(self, seq_id: int, ids: list[int], live: list[int]) -> _Row:
        row = self.rows.get(seq_id)
        if row is None:
            if not self.free:
                self._reclaim(set(live))
            row = self.rows[seq_id] = _Row(self.free.pop(), ids, 0)
        row.source, row.length = ids, 0
        return row

    def _reclaim(self, live: set[int]) -> None:
        for seq_id in [s for s in self.rows if s not in live]:
            self.free.append(self.rows.pop(seq_id).index)
        if not self.free:
            capacity = self.table.shape[0]
            self._resize(2 * capacity, self.table.shape[1])
            self.free.extend(range(2 * capacity - 1, capacity - 1, -1))

    def _resize(self, rows: int, width: int) -> None:
        grown = np.zeros((rows, width), dtype=np.int32)
        grown[: self.table.shape[0], : self.table.shape[1]] = self.table
        self.table = grown


class ModelRunner:
    """`max_num_seqs` and `max_model_len` bound the decode graphs; a profiled engine gets them
    from `profile_run`. `cuda_graphs` None defers to EDGEPAGED_CUDA_GRAPHS (default on)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        block_size: int,
        *,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.cuda_graphs = cuda_graphs
        param = model.embed_tokens
        self.device, self.dtype = param.device, param.dtype
        self.kv_cache = torch.empty(0, dtype=self.dtype, device=self.device)
        self.kv_scales: torch.Tensor | None = None  # an 8-bit pool's scales, one per (slot, head)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | list[tuple[QuantizedCache, QuantizedCache]] = []
        self.graphs: DecodeGraphs | None = None
        self._tables = _TableMirror()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The pool's one allocation for every layer's K and V; it never grows afterwards.

        Zeroed, not empty: padded attention reads of never-written slots must stay finite.
        Decode graphs are captured here, after the pool exists, because they hold its address.
        """
        self.graphs = None  # graphs of an earlier pool must not outlive it
        self._allocate(num_blocks)
        if self._graphs_apply():
            self.warm_up(num_blocks)
            self.graphs = self._capture_graphs()

    def measure_graph_bytes(self) -> int:
        """What the decode graphs will hold, measured by a trial capture over a throwaway cache
        one sequence long, so the memory plan can leave room for them before the pool exists."""
        if not self._graphs_apply():
            return 0
        saved = self.kv_cache, self.kv_scales, self.kv_caches
        self._allocate(-(-self.max_model_len // self.block_size))
        try:
            trial = self._capture_graphs()
            return trial.memory_bytes
        finally:
            trial = None  # the trial graphs and their pool go before the real pool is allocated
            self.kv_cache, self.kv_scales, self.kv_caches = saved
            torch.cuda.empty_cache()

    def _capture_graphs(self) -> DecodeGraphs:
        """Graphs over the current pool, wide enough for a full decode batch and for one chunk
        of GRAPH_MAX_CHUNK tokens even where max_num_seqs is smaller (a cached prefix's tail)."""
        rows = max(self.max_num_seqs, GRAPH_MAX_CHUNK)
        graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, self.block_size, rows, self.max_model_len)
        graphs.capture()
        return graphs

    def _allocate(self, num_blocks: int) -> None:
        """The pool in the backend's KV dtype (the model's unless it reads 8-bit pools). An
        8-bit pool gets a parallel fp16 scales tensor [layers, 2, blocks, block_size, heads],
        indexed by the same slots, and each layer's pools travel as QuantizedCache pairs, so
        the captured decode graphs hold the scales' addresses along with the codes'."""
        cfg = self.model.config
        shape = (cfg.num_layers, 2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        kv_dtype = self.backend.kv_dtype
        if kv_dtype is None:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_scales = None
            self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
            return
        # Zero bytes are code 0 in int8 and 0.0 in e4m3fn; zero scales keep unwritten slots at 0.
        self.kv_cache = torch.zeros(shape, dtype=torch.uint8, device=self.device).view(kv_dtype)
        self.kv_scales = torch.zeros(shape[:-1], dtype=KV_SCALE_DTYPE, device=self.device)
        self.kv_caches = [
            tuple(QuantizedCache(self.kv_cache[i, j], self.kv_scales[i, j]) for j in (0, 1))
            for i in range(cfg.num_layers)
        ]

    def _graphs_apply(self) -> bool:
        return (
            self.device.type == "cuda"
            and self.backend.name in _GRAPH_BACKENDS
            and self.max_num_seqs is not None
            and self.max_model_len is not None
            and graphs_requested(self.cuda_graphs)
        )

    def set_decode_fusions(self, fusions: DecodeFusions) -> None:
        """Switch the decode fusions (for measuring each one); decode graphs are captured again."""
        self.model.decode_fusions = fusions
        if hasattr(self.backend, "merge_in_kernel"):
            self.backend.merge_in_kernel = fusions.attn
        if self.graphs is not None:
            self.graphs = None
            self.graphs = self._capture_graphs()

    @torch.inference_mode()
    def profile_run(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """Run the largest steps the scheduler may issue, on a throwaway cache, so the caller
        can read the activation peak: one full token budget of prefill (as few sequences as the
        context allows, the quadratic worst case for attention), then a full batch of decodes.
        The limits are kept: they size the decode graphs captured with the real pool."""
        self.max_num_seqs = self.max_num_seqs or max_num_seqs
        self.max_model_len = self.max_model_len or max_model_len
        bs = self.block_size
        seq_len = min(max_num_batched_tokens, max_model_len - 1)
        lengths = [seq_len] * (max_num_batched_tokens // seq_len)
        if max_num_batched_tokens % seq_len:
            lengths.append(max_num_batched_tokens % seq_len)
        blocks_per_seq = -(-max(seq_len, 1) // bs)
        saved = self.kv_cache, self.kv_scales, self.kv_caches
        # Every synthetic sequence shares one table: their writes collide harmlessly, and the
        # throwaway cache stays one sequence long however many sequences the step holds.
        self._allocate(blocks_per_seq)
        try:
            for query_lens, computed in (
                (np.array(lengths), np.zeros(len(lengths), dtype=np.int64)),
                (np.ones(max_num_seqs, dtype=np.int64), np.full(max_num_seqs, seq_len - 1)),
            ):
                self._run_synthetic(query_lens, computed, blocks_per_seq)
        finally:
            self.kv_cache, self.kv_scales, self.kv_caches = saved

    @torch.inference_mode()
    def warm_up(self, num_blocks: int) -> None:
        """Compile the kernels' variants that only live traffic would otherwise reach, and then
        in the middle of serving: eager decode with and without a split context, a prompt's
        tail after its cached prefix, fresh prompts, and steps mixing them (on an H200 they
        cost the first burst 1.5-2.4 s). Every slot is -1, so the pool is read, never written."""
        bs = self.block_size
        width = min(num_blocks, -(-self.max_model_len // bs))
        long = width * bs - 1
        for query_lens, computed in (
            ([1], [long]),
            ([1, 1, 1], [5, min(700, long), long]),
            ([64], [0]),
            ([17], [min(100, long - 17)]),
            ([1, 1, 16, 40], [10, min(300, long), min(64, long - 16), 0]),
        ):
            self._run_synthetic(np.array(query_lens), np.array(computed, dtype=np.int64), width, write=False)
        torch.cuda.synchronize(self.device)

    def _run_synthetic(self, query_lens: np.ndarray, computed: np.ndarray, width: int, write: bool = True) -> None:
        """One eager step of token-0 sequences that all share the table 0..width-1 (their
        writes collide harmlessly); with write=False every slot is -1 and the pool is only read."""
        tables = np.tile(np.arange(width, dtype=np.int32), (len(query_lens), 1))
        ids = np.zeros(int(query_lens.sum()), dtype=np.int64)
        step = host_step(ids, computed, query_lens, tables, np.ones(len(query_lens), dtype=np.int64), self.block_size)
        if not write:
            step.slot_mapping[:] = -1
        self._sample(step, self._forward_eager(step))

    @property
    def kv_cache_bytes(self) -> int:
        scales = 0 if self.kv_scales is None else self.kv_scales.numel() * self.kv_scales.element_size()
        return self.kv_cache.numel() * self.kv_cache.element_size() + scales

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks before anyone writes into the copies; an
        8-bit pool's blocks take their scales along (copied as bytes: torch does not index fp8)."""
        if not copies:
            return
        (pairs,) = stage([np.array(copies, dtype=np.int64).T], self.device)
        if self.kv_scales is None:
            self.kv_cache[:, :, pairs[1]] = self.kv_cache[:, :, pairs[0]]
            return
        codes = self.kv_cache.view(torch.uint8)
        codes[:, :, pairs[1]] = codes[:, :, pairs[0]]
        self.kv_scales[:, :, pairs[1]] = self.kv_scales[:, :, pairs[0]]

    def build_step(self, chunks: list[ScheduledChunk], kv: KVCacheManager, tables_changed: bool) -> HostStep:
        """The step's host inputs; `chunks` must list the one-token chunks first.

        A token still on the device (see overlap.py) is a placeholder 0 here; it only ever
        sits in a one-token chunk, so its row is its chunk's index. A chunk's drafts follow its
        sequence's last token, and every row from that token on is sampled.
        """
        n = len(chunks)
        seqs = [c.seq for c in chunks]
        computed = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)
        query_lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=n)
        total = int(query_lens.sum())
        if total == n:
            tokens = (0 if s.num_pending else s.token_ids[c.start] for s, c in zip(seqs, chunks))
        else:
            tokens = itertools.chain.from_iterable(
                (c.seq.token_ids[c.start : c.start + c.num_tokens - len(c.draft)] or [0]) + list(c.draft) for c in chunks
            )
        input_ids = np.fromiter(tokens, dtype=np.int64, count=total)
        tables = self._tables.gather([s.seq_id for s in seqs], kv, tables_changed)
        sampled = np.fromiter(((1 + len(c.draft)) * c.completes_prompt for c in chunks), dtype=np.int64, count=n)
        return host_step(input_ids, computed, query_lens, tables, sampled, self.block_size)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, kv: KVCacheManager, fed: FedRows | None = None, *, tokens_ok: bool = False
    ) -> StepResult:
        """Launch the step; nothing here waits for the device. `fed` names the rows whose
        tokens are still on the device (steps overlapping, see overlap.py). `tokens_ok`: the
        caller samples, so a step of one plainly greedy row (SamplingParams.plain_greedy) may
        return its token instead of logits (LlamaForCausalLM.greedy_tokens)."""
        self.copy_blocks(out.block_copies)
        chunks = out.chunks
        step = self.build_step(chunks, kv, tables_changed=bool(out.block_copies))
        graphs = self.graphs
        if graphs and step.max_query_len <= GRAPH_MAX_CHUNK and graphs.size_for(step.input_ids.shape[0]):
            hidden = graphs.run(
                step.input_ids, step.positions, step.slot_mapping, *step.token_rows(), fed=fed
            )
        else:
            hidden = self._forward_eager(step, fed)
        if not step.sample_rows.shape[0]:
            return StepResult(None, [])
        sampled = [c for c in chunks if c.completes_prompt]
        if tokens_ok and self.model.folds_greedy(step.sample_rows.shape[0]) and sampled[0].seq.request.params.plain_greedy:
            row = int(step.sample_rows[0])
            return StepResult(None, sampled, self.model.greedy_tokens(hidden[row : row + 1]))
        return StepResult(self._sample(step, hidden), sampled)

    def _forward_eager(self, step: HostStep, fed: FedRows | None = None) -> torch.Tensor:
        nd = step.num_decode
        prefill_lens = step.query_lens[nd:]
        starts = np.zeros(prefill_lens.shape[0] + 1, dtype=np.int32)
        np.cumsum(prefill_lens, out=starts[1:])
        extra = [fed.rows, fed.src] if fed is not None else []
        ids, positions, slots, context_lens, starts, tables, *fed_views = stage(
            [step.input_ids, step.positions, step.slot_mapping, step.context_lens, starts, step.block_tables, *extra],
            self.device,
        )
        if fed is not None:
            fed.fill(ids, *fed_views)
        batch = AttentionBatch(
            slot_mapping=slots,
            num_decode_tokens=nd,
            decode_block_tables=tables[:nd],
            decode_context_lens=context_lens[:nd],
            max_decode_context_len=int(step.context_lens[:nd].max(initial=0)),
            prefill_block_tables=tables[nd:],
            prefill_query_start_loc=starts,
            prefill_context_lens=context_lens[nd:],
            max_prefill_query_len=int(prefill_lens.max(initial=0)),
            max_prefill_context_len=int(step.context_lens[nd:].max(initial=0)),
            block_size=self.block_size,
        )
        return self.model(ids, positions, self.kv_caches, self.backend.prepare(batch))

    def _sample(self, step: HostStep, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the sampled rows; a decode step samples every row and needs no gather."""
        if step.samples_every_row:
            return self.model.compute_logits(hidden)
        (rows,) = stage([step.sample_rows], self.device)
        return self.model.compute_logits(hidden[rows])


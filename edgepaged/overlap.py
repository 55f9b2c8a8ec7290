"""Launching a step and landing its tokens, overlapped or one at a time.

The execute part of the step loop. A step is launched (forward pass, sampler, and the copy of
the sampled tokens to the host queued behind them) without waiting for the device. Landing it
waits for that step alone and returns its tokens. Overlapping (`EngineConfig.overlap_steps`),
a step is launched before the previous step's tokens are read: its sequences take those tokens
from the device (`TokenFeed`), and the host lands them while the GPU runs the new step. A
sequence that stopped on a token read late has computed one token too many; it is dropped.
A step with speculative drafts (speculative.py) lands at once: its rows are verified on the
device and land as the 1 + a tokens each chunk keeps, the first carrying the chunk's verdict.

This module is the one writer of `Sequence.num_pending`, the count of a sequence's tokens
sampled on the device but not landed yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .beam_search import num_candidates
from .cuda_graph import FedRows
from .cache import KVCacheManager
from .model_runner import ModelRunner
from .output_processor import SampledLogprobs
from .sampling import Sampler, SamplingRow
from .scheduler import ScheduledChunk, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .speculative import DraftVerdict, accepted_tokens, verify


@dataclass(slots=True)
class TokenFeed:
    """The tokens the previous step sampled, still on the device, for a step launched before
    the host has read them: `rows` maps a sequence id to its token's index in `tokens`."""

    tokens: torch.Tensor  # int64 [R]
    rows: dict[int, int]

    def for_step(self, seqs: list[Sequence]) -> FedRows | None:
        """Which of a step's token rows take their id from here: the one-token rows (listed
        first, one per sequence) of sequences with a token still on the device."""
        rows = [i for i, seq in enumerate(seqs) if seq.num_pending]
        if not rows:
            return None
        src = [self.rows[seqs[i].seq_id] for i in rows]
        return FedRows(self.tokens, np.array(rows, dtype=np.int64), np.array(src, dtype=np.int64))


class _ToHost:
    """A step's sampled tokens (and their log-probabilities, if asked) on their way to the host.

    The copies are queued right behind the sampler, so reading them waits for that step only,
    not for a step launched after it.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        if tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self._host, tensors):
                host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tensors, None

    def values(self) -> list[list]:
        if self._ready is not None:
            self._ready.synchronize()
        return [t.tolist() for t in self._host]


@dataclass(slots=True)
class StepInFlight:
    seqs: list[Sequence]  # one per sampled row, forked samples included
    host: _ToHost
    feed: TokenFeed  # the tokens on the device: the next step's inputs
    # Land at once: a row has penalties (its next step needs this token on the host) or is a
    # beam (its group chooses on the host before it goes on), or the step completes a prompt.
    # A first token is what a waiting client sees; and a prefill step is long on the GPU, so
    # overlapping it saves little host time. Landing such steps a step late made the RAG
    # burst's TTFT p50 0.26 s against 0.15 s (H200).
    lands_at_once: bool
    drafts: DraftRows  # chunks with drafts: their rows are verified, not sampled


@dataclass(slots=True)
class LandedToken:
    seq: Sequence
    token: int
    logprobs: SampledLogprobs | None
    verdict: DraftVerdict | None = None  # on the first token a verify step lands for a sequence


@dataclass(slots=True)
class DraftRows:
    """A step's chunks with drafts (speculative.py) and where their rows start in the logits."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    first_rows: list[int] = field(default_factory=list)

    def add(self, chunk: ScheduledChunk, first_row: int) -> None:
        chunk.seq.num_pending += 1
        self.chunks.append(chunk)
        self.first_rows.append(first_row)

    def verify(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Queue the drafts' check on the device: accept flags and tokens, one per row. Row i of
        a chunk is sampled with the history up to its own position (drafts before it included),
        so penalties see what plain decoding would have seen there."""
        rows, sampling_rows, targets = [], [], []
        for chunk, first in zip(self.chunks, self.first_rows):
            seq, params = chunk.seq, chunk.seq.request.params
            draft = list(chunk.draft)
            for i in range(len(draft) + 1):
                rows.append(first + i)
                history = (seq.request.prompt_token_ids, seq.output_token_ids + draft[:i]) if params.has_penalties else (None, None)
                sampling_rows.append(SamplingRow(params, seq.generator, *history))
            targets += draft + [-1]
        selected = Sampler.select(logits, rows) if len(rows) != logits.shape[0] else logits
        target_ids = torch.tensor(targets, dtype=torch.int64).to(logits.device, non_blocking=True)
        return list(verify(selected, sampling_rows, target_ids))

    def land(self, accept: list[bool], tokens: list[int]) -> list[LandedToken]:
        landed, row = [], 0
        for chunk in self.chunks:
            seq, width = chunk.seq, len(chunk.draft) + 1
            seq.num_pending -= 1
            kept = accepted_tokens(list(chunk.draft), accept[row : row + width], tokens[row : row + width])
            row += width
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted while this step ran
            verdict = DraftVerdict(len(chunk.draft), len(kept) - 1)
            landed += [LandedToken(seq, t, None, verdict if i == 0 else None) for i, t in enumerate(kept)]
        return landed


class StepPipeline:
    def __init__(self, runner: ModelRunner, sampler: Sampler, overlap: bool):
        self.runner = runner
        self.sampler = sampler
        self.overlap = overlap
        self.in_flight: StepInFlight | None = None

    def step(self, sched: SchedulerOutput, kv: KVCacheManager, forks: dict[int, list[Sequence]]) -> list[LandedToken]:
        """Launch the scheduled step; return the tokens that landed meanwhile: the previous
        step's when overlapping (or when nothing new was launched), else this step's own."""
        launched = self._launch(sched, kv, forks) if sched.chunks else None
        landed = self._land(self.in_flight) if self.in_flight is not None else []
        self.in_flight = launched
        if launched is not None and (not self.overlap or launched.lands_at_once):
            self.in_flight = None
            landed += self._land(launched)
        return landed

    def _launch(self, sched: SchedulerOutput, kv: KVCacheManager, forks: dict[int, list[Sequence]]) -> StepInFlight | None:
        flight = self.in_flight
        fed = flight.feed.for_step([c.seq for c in sched.chunks]) if flight is not None else None
        result = self.runner.execute(sched, kv, fed, tokens_ok=True)
        if result.logits is None and result.tokens is None:
            return None
        seqs, rows, drafts = [], [], DraftRows()
        row = 0
        for chunk in result.sampled:
            if chunk.draft:
                drafts.add(chunk, row)
                row += 1 + len(chunk.draft)
                continue
            for seq in (chunk.seq, *forks.get(chunk.seq.seq_id, ())):
                seqs.append(seq)
                rows.append(row)
            row += 1
        logits = result.logits
        if logits is not None and len(rows) != row:
            logits = self.sampler.select(logits, rows)
        sampling_rows, num_top = [], -1
        lands_at_once = any(c.num_tokens > 1 or c.start < c.seq.num_prompt_tokens for c in result.sampled)
        for seq in seqs:
            params = seq.request.params
            if params.has_penalties:
                # Penalties read the whole history: a step sampling such a row lands before the
                # next one launches (see `step`), so none of its tokens is still on the device.
                assert not seq.num_pending, "a penalised sequence has a token still on the device"
                lands_at_once = True
                sampling_rows.append(SamplingRow(params, seq.generator, seq.request.prompt_token_ids, seq.output_token_ids))
            else:
                sampling_rows.append(SamplingRow(params, seq.generator))
            if params.logprobs is not None:
                num_top = max(num_top, params.logprobs)
            if params.beam_width > 1:
                # The host chooses a group's next tokens from its beams' candidates before any
                # beam's next step can launch (beam_search.py).
                lands_at_once = True
                num_top = max(num_top, num_candidates(seq.request))
            # Drafts are taken from the host's tokens: a speculative request's every step lands
            # at once, so its next step can draft from the token this one samples.
            lands_at_once |= params.speculative > 0
            seq.num_pending += 1
        tokens = result.tokens if result.tokens is not None else self.sampler(logits, sampling_rows)
        to_host = [tokens]
        if num_top >= 0:
            to_host += self.sampler.logprobs(logits, tokens, num_top)
        if drafts.chunks:
            lands_at_once = True
            to_host += drafts.verify(result.logits)
        feed = TokenFeed(tokens, {s.seq_id: i for i, s in enumerate(seqs)})
        return StepInFlight(seqs, _ToHost(to_host), feed, lands_at_once, drafts)

    @staticmethod
    def _land(flight: StepInFlight) -> list[LandedToken]:
        """Read a launched step's tokens (waiting for that step only)."""
        values = flight.host.values()
        verified = values[-2:] if flight.drafts.chunks else None
        tokens, *logprobs = values[:-2] if verified else values
        landed = []
        for row, (seq, token) in enumerate(zip(flight.seqs, tokens)):
            seq.num_pending -= 1
            if seq.status is SequenceStatus.FINISHED:
                continue  # stopped or aborted while this step ran: its token is dropped
            lp = None
            params = seq.request.params
            if logprobs and (params.logprobs is not None or params.beam_width > 1):
                chosen, top_ids, top = logprobs
                lp = SampledLogprobs(chosen[row], top_ids[row], top[row])
            landed.append(LandedToken(seq, token, lp))
        if verified:
            landed += flight.drafts.land(*verified)
        return landed

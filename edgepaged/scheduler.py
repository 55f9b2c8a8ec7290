"""Continuous batching: which sequences run this step, and how many of their tokens.

One token budget per step covers decodes and prefill chunks alike. Running sequences go first
(oldest first), so decodes are never starved by a long prompt; the budget left over admits
waiting sequences, each only if the pool has blocks for its first chunk. When a running
sequence cannot grow, the newest running sequence is preempted: its blocks go back to the pool
and it waits at the front of the queue to be recomputed, prefix cache permitting, so nothing is
lost and the oldest requests always make progress.

A waiting sequence whose next uncached full block is one a running sequence is computing right
now waits (without holding back the queue behind it) until that block is cached: requests that
arrive together with one new prefix compute it once, not once each. The block is indexed when
the step that computes it is scheduled, so the waiters are admitted by the very next step, all
of them at once, each computing only its own tail (for an identical prompt, its last token).

The scheduler is the one writer of `Sequence.num_computed_tokens`: a scheduled chunk counts as
computed as soon as it is handed out (steps run in order on the device, so the next step may
read what this one writes), a prefix hit counts at admission and a preemption resets it.

With overlapped steps (see overlap.py) a sequence may have its newest token still on the
device: `Sequence.num_tokens` counts it, so its next one-token chunk is planned as usual, and a
sequence whose token in flight is its last gets nothing more.

A request with `SamplingParams.speculative` k gets drafts (speculative.py): a decode chunk of
1 + d tokens, the pending token and d <= k draft tokens copied from earlier in its text, when the
budget, the request's remaining length and the pool allow them (drafts never preempt anyone). A
verify step counts all 1 + d as computed; when its tokens land, `append_token` rolls
`num_computed_tokens` back to the accepted position and the KV manager trims the blocks past it.

Beam search (beam_search.py) forks beams from running ones mid-decode (`fork`), extends them
(`append_token`) and drops them (`finish`); a beam whose candidates landed before its siblings'
has nothing to compute until its group has chosen, and is passed over.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache import BlockHash, KVCacheManager
from .sequence import Sequence, SequenceStatus
from .speculative import DraftVerdict, PromptLookup


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # tokens of the sequence computed before this chunk
    num_tokens: int  # drafts included
    draft: tuple[int, ...] = ()  # speculative tokens after the sequence's last

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits are sampled
        (every row from that token on, for a chunk with drafts)."""
        return self.start + self.num_tokens - len(self.draft) == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # one-token chunks first
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.drafters: dict[int, PromptLookup] = {}  # seq id -> its drafter (speculative requests)
        self.num_draft_tokens = self.num_accepted_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A forked sample joins the batch at once, holding the parent's blocks and progress."""
        child.num_computed_tokens = parent.num_computed_tokens
        self.kv.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Full blocks that running sequences are still computing (prompts and recomputes): a
        # waiting sequence whose next uncached block is one of them waits until it is cached.
        computing: set[BlockHash] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_computed_tokens + 1 < seq.num_tokens:
                computing.update(self.kv.unregistered_hashes(seq))
            # Nothing to schedule: its last token is on the device, or (a beam whose candidates
            # have landed) it waits for the rest of its beam group (beam_search.py).
            if seq.last_token_in_flight or seq.num_computed_tokens == seq.num_tokens:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            draft = self._draft(seq, budget - n) if n == 1 and seq.request.params.speculative else ()
            if draft and not self.kv.can_allocate(seq, n + len(draft)):
                draft = ()
            n += len(draft)
            while not self.kv.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.kv.allocate(seq, n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n, draft))
            budget -= n
            i += 1
        # After a preemption the pool is tight: admitting now would only preempt again.
        w = 0
        while not out.preempted and w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[w]
            if seq.num_pending:  # preempted while its token was on the device: it lands next step
                break
            hit = self.kv.find_prefix(seq)
            if computing and self.kv.next_uncached_hash(seq, hit) in computing:
                w += 1  # its prefix is being computed by a running sequence: reuse it, later
                continue
            n = min(seq.num_tokens - hit.num_tokens, budget)
            if not self.kv.can_allocate(seq, n, hit):
                break
            del self.waiting[w]
            self.kv.allocate(seq, n, hit)
            seq.num_computed_tokens = hit.num_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, hit.num_tokens, n))
            budget -= n
            computing.update(self.kv.unregistered_hashes(seq))
        out.chunks.sort(key=lambda c: c.num_tokens > 1)  # the runner's layout: decodes first
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.kv.commit(chunk.seq)
        out.block_copies = self.kv.take_copies()
        return out

    def _draft(self, seq: Sequence, room: int) -> tuple[int, ...]:
        """Draft tokens for a decoding sequence of a speculative request: at most `room` (the
        budget left), and one fewer than the tokens it may still produce, since a verify step
        lands one token more than it keeps drafts. Drafts need the last token on the host."""
        request = seq.request
        k = min(request.params.speculative, room, request.max_total_tokens - len(seq.token_ids) - 1)
        if k <= 0 or seq.num_pending or not seq.num_output_tokens:
            return ()
        drafter = self.drafters.get(seq.seq_id)
        if drafter is None:
            drafter = self.drafters[seq.seq_id] = PromptLookup()
        return tuple(drafter.propose(seq.token_ids, k))

    def append_token(self, seq: Sequence, token: int, verdict: DraftVerdict | None = None) -> None:
        """A sampled token reached the host; a block it completes can now be indexed. The first
        token of a verify step brings its verdict: the rejected drafts' positions were counted
        as computed and are rolled back before the token is appended, so no block holding a
        rejected draft's keys and values is ever indexed."""
        if verdict is not None:
            self._settle_drafts(seq, verdict)
        seq.token_ids.append(token)
        if seq.status is SequenceStatus.RUNNING:
            self.kv.commit(seq)

    def _settle_drafts(self, seq: Sequence, verdict: DraftVerdict) -> None:
        request = seq.request
        request.num_draft_tokens += verdict.num_drafts
        request.num_accepted_tokens += verdict.num_accepted
        request.num_verify_steps += 1
        self.num_draft_tokens += verdict.num_drafts
        self.num_accepted_tokens += verdict.num_accepted
        self.drafters[seq.seq_id].record(verdict.num_accepted, verdict.num_drafts)
        if seq.status is SequenceStatus.RUNNING:
            seq.num_computed_tokens -= verdict.num_drafts - verdict.num_accepted
            self.kv.trim(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done or aborted) wherever it is, returning its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.kv.free(seq.seq_id)
        self.drafters.pop(seq.seq_id, None)

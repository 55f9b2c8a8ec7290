"""Speculative decoding by prompt lookup: drafts copied from the text itself, checked in one step.

A RAG answer quotes its retrieved passages, code edits repeat the code, summaries reuse names: the
next tokens often already occur earlier in the prompt or the output. `PromptLookup` finds the
latest earlier occurrence of the sequence's last n tokens (n from NGRAM_MAX down to NGRAM_MIN)
and proposes the tokens that followed it. The scheduler appends those drafts to the sequence's
one-token decode chunk, the model computes all 1 + k positions in one paged forward pass, and
`verify` decides on the device which drafts the model agrees with:

- greedy rows accept a draft while it is the argmax (penalties applied), so the output is the
  plain greedy output, token for token;
- sampled rows use standard rejection sampling with a point-mass draft distribution: draft x at
  position i is kept with probability p_i(x); the first rejected position draws from p_i with x
  removed (renormalised), and when every draft is kept the last row draws a bonus token from its
  own p. Each landed token is then distributed exactly as plain sampling would draw it.

A verify step lands 1 + a tokens (a accepted drafts) and the KV of the k - a rejected positions
is rolled back: the scheduler sets `num_computed_tokens` to the accepted position and the KV
manager frees the blocks past it (`KVCacheManager.trim`); a block is indexed for prefix caching
only once its tokens are all accepted ones, so the cache never holds a rejected draft.

Prompts with nothing to copy must not pay for drafts the model rejects: after MISS_LIMIT verify
steps in a row that kept no draft, a sequence stops drafting for a pause that doubles with each
further run of misses (up to MAX_PAUSE steps), and an accepted draft resets it. Between misses the
draft length follows what the model keeps: one more than the last step kept, doubled after a
step that kept every draft. A verify row the model rejects still costs a row of the forward
pass, which on a CPU (compute-bound int4 matmuls) is most of a decode step's cost per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import SamplingRow, adjusted_logits, exponential_noise, greedy_mask, probabilities

NGRAM_MAX = 4
NGRAM_MIN = 2
MISS_LIMIT = 3
FIRST_PAUSE = 8
MAX_PAUSE = 256


@dataclass(slots=True)
class PromptLookup:
    """One sequence's drafter: an index of its n-grams and its record of misses.

    `_ends[n]` maps every n-gram of the tokens seen so far (but the current suffix) to where its
    first and its latest occurrences end; it is extended by the tokens appended since the last
    call, so a step costs a few dictionary operations whatever the prompt's length. The latest
    occurrence is the likeliest to continue alike (the passage being quoted right now); when it
    is too close to the end to give k tokens (a phrase that just repeated) the first one is used.
    """

    _ends: dict[int, dict[tuple[int, ...], list[int]]] = field(
        default_factory=lambda: {n: {} for n in range(NGRAM_MIN, NGRAM_MAX + 1)}
    )
    _indexed: int = 0  # n-grams ending at positions < this are in `_ends`
    _steps: int = 0  # decode steps seen (proposals asked for)
    _resume_at: int = 0  # no drafts before this step
    _misses: int = 0  # verify steps in a row that kept no draft
    _pause: int = FIRST_PAUSE
    _length: int = 0  # drafts to propose at most (0: as many as asked, before any verify step)

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching
        suffix; none while paused or when no suffix of NGRAM_MIN tokens occurred before."""
        self._steps += 1
        if self._steps < self._resume_at:
            return []
        k = min(k, self._length) if self._length else k
        end = len(token_ids)
        for n, index in self._ends.items():
            for stop in range(max(self._indexed, n), end):
                ends = index.setdefault(tuple(token_ids[stop - n : stop]), [stop, stop])
                ends[1] = stop
        self._indexed = max(self._indexed, end)
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            ends = self._ends[n].get(tuple(token_ids[end - n :])) if end > n else None
            if ends is not None:
                at = ends[1] if ends[1] + k <= end else ends[0]
                return token_ids[at : at + k]
        return []

    def record(self, num_accepted: int, num_drafts: int) -> None:
        """The outcome of a verify step of this sequence's drafts."""
        self._length = 2 * num_drafts if num_accepted == num_drafts else num_accepted + 1
        if num_accepted:
            self._misses, self._pause = 0, FIRST_PAUSE
            return
        self._misses += 1
        if self._misses >= MISS_LIMIT:
            self._resume_at = self._steps + self._pause
            self._pause = min(2 * self._pause, MAX_PAUSE)
            self._misses = 0


@dataclass(slots=True)
class DraftVerdict:
    """What a verify step kept of a sequence's drafts (carried by its first landed token)."""

    num_drafts: int
    num_accepted: int


def verify(logits: torch.Tensor, rows: list[SamplingRow], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check drafts against the model, on the device, without waiting for it.

    `logits` [R, V] are a step's verify rows with their sampling rows (row i of a chunk carries
    the history up to its own position, drafts before it included); `targets` [R] int64 holds
    the draft each row checks (the token at the next position), -1 for a chunk's last row.
    Returns `accept` [R] bool (row i keeps its draft) and `tokens` [R] int64: what row i lands
    when its draft is the first rejected one, or, for a last row, the bonus token.
    """
    logits = adjusted_logits(logits, rows)
    greedy_tokens = logits.argmax(dim=-1)
    greedy_accept = greedy_tokens == targets
    if all(r.params.greedy for r in rows):
        return greedy_accept, greedy_tokens
    probs = probabilities(logits, rows)
    has_target = targets >= 0
    index = targets.clamp(min=0).unsqueeze(1)
    p_target = probs.gather(1, index).squeeze(1).where(has_target, torch.zeros_like(probs[:, 0]))
    uniform = torch.rand_like(p_target)
    for i, r in enumerate(rows):
        if r.generator is not None:
            uniform[i : i + 1].uniform_(generator=r.generator)
    accept = uniform < p_target
    # The residual max(p - q, 0) of a point-mass draft q is p without the draft token.
    residual = probs.scatter(1, index, torch.zeros_like(index, dtype=probs.dtype)).where(has_target.unsqueeze(1), probs)
    sampled = (residual / exponential_noise(residual, rows)).argmax(dim=-1)
    is_greedy = greedy_mask(rows, logits.device)
    return torch.where(is_greedy, greedy_accept, accept), torch.where(is_greedy, greedy_tokens, sampled)


def accepted_tokens(draft: list[int], accept: list[bool], tokens: list[int]) -> list[int]:
    """The tokens one chunk lands: its leading accepted drafts, then the first rejected row's
    token (or the last row's bonus token when every draft was kept)."""
    kept = 0
    while kept < len(draft) and accept[kept]:
        kept += 1
    return draft[:kept] + [tokens[kept]]

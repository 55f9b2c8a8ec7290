"""What the engine hands back: shaped like vLLM's outputs so callers already know them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature and penalties),
    with the likeliest alternatives at that position, best first."""

    token_id: int
    token: str  # its text alone ("" for a model without a tokenizer)
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, log-probability)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running, then "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
    # Beam search only: the sum of the tokens' log-probabilities, and what beams are ranked by,
    # that sum / len(token_ids) ** length_penalty (transformers' sequences_scores).
    cumulative_logprob: float | None = None
    score: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)


def merge_deltas(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two successive DELTA outputs of one request as one (a consumer that fell behind reads
    them together): each sample's new text, tokens and log-probabilities, in order."""
    by_index = {c.index: c for c in earlier.outputs}
    merged = []
    for c in later.outputs:
        e = by_index.pop(c.index, None)
        if e is None:
            merged.append(c)
            continue
        logprobs = None if e.logprobs is None and c.logprobs is None else (e.logprobs or []) + (c.logprobs or [])
        merged.append(CompletionOutput(c.index, e.text + c.text, e.token_ids + c.token_ids, c.finish_reason, logprobs))
    merged += by_index.values()  # samples the later step did not touch
    merged.sort(key=lambda c: c.index)
    return RequestOutput(later.request_id, later.prompt_token_ids, merged, later.finished, later.metrics)


@dataclass(slots=True)
class EngineStats:
    """Pool and scheduler counters; used + free + cached == num_blocks."""

    num_blocks: int
    block_size: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    prefix_hit_rate: float
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    num_running: int
    num_waiting: int
    prompt_tokens_total: int
    generation_tokens_total: int
    peak_blocks_used: int
    peak_running: int
    draft_tokens: int = 0  # speculative drafts verified, and how many of them were kept
    accepted_draft_tokens: int = 0

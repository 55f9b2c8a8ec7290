"""Request and sequence state: what the scheduler plans with.

A request owns one sequence until its prompt is prefilled; with n > 1 it then forks into n
sequences that share the prompt's blocks. A beam search request's sequences are its live beams,
forked and dropped step by step (beam_search.py). The scheduler only ever sees sequences. Each field
has one writer: the scheduler (`num_computed_tokens`, `token_ids` past the prompt, `status`,
`finish_reason`, the request's draft counts), the step pipeline (`num_pending`, overlap.py), the output processor
(`Request.first_token_time`); the text and log-probabilities live in output_processor.py.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + output, capped by the model's context length
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    sequences: list[Sequence] = field(default_factory=list)
    # Speculative decoding (speculative.py): draft tokens verified, how many were kept, and the
    # verify steps they took; accepted / steps is the mean accepted draft length.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0

    @property
    def needs_fork(self) -> bool:
        """An n > 1 request runs one sequence until its prompt is prefilled, then forks (beams
        fork as the search goes, not here)."""
        return self.params.beam_width == 1 and len(self.sequences) < self.params.n

    @property
    def finished(self) -> bool:
        if not all(s.status is SequenceStatus.FINISHED for s in self.sequences):
            return False
        return not self.needs_fork or any(s.finish_reason == "abort" for s in self.sequences)


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request: Request
    token_ids: list[int]
    index: int = 0  # which of the request's n samples this is
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # Sampled by steps still on the device, not yet in token_ids: at most one when a step is
    # scheduled, two for the moment between launching a step and landing the one before.
    num_pending: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence holds, counting one still on the device: the scheduler plans
        the next step with it, and the model runner feeds it from the device."""
        return len(self.token_ids) + self.num_pending

    @property
    def last_token_in_flight(self) -> bool:
        """The token on the device is the last this sequence may produce (max_tokens or the
        context): nothing more is scheduled for it, it finishes when that token lands."""
        if not self.num_pending:
            return False
        params = self.request.params
        return (
            self.num_output_tokens + self.num_pending >= params.max_tokens
            or self.num_tokens >= self.request.max_total_tokens
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

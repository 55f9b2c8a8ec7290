"""From sampled tokens to what callers see: text, log-probabilities, stops, finished outputs.

The last of the step's three calls (schedule → execute → update from the output) hands each
landed token here after the scheduler has appended it. Per sequence this keeps the incremental
detokenizer, how much of its text may be shown (a possible stop string is held back until it
is ruled out) and the log-probabilities, so `Sequence` stays the scheduler's view of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .sampling import OutputKind
from .sequence import Request, Sequence


@dataclass(slots=True)
class SampledLogprobs:
    """One token's log-probability and its step's likeliest alternatives, as read off the device."""

    chosen: float
    top_ids: list[int]
    top: list[float]


@dataclass(slots=True)
class _SeqOutput:
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[TokenLogprob] | None
    # Characters a stop string could still claim at the text's end, kept back until ruled out.
    stop_holdback: int
    visible_text_len: int = 0  # how much of the detokenized text may be shown
    # What the request's outputs have carried so far (OutputKind.DELTA sends only the rest).
    sent_tokens: int = 0
    sent_text_len: int = 0


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._seqs: dict[int, _SeqOutput] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def add_sequence(self, seq: Sequence) -> None:
        request = seq.request
        if request.params.beam_width > 1:
            return  # a beam's text is made once, from its finished hypothesis (beam_search.py)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)
        params = request.params
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self._seqs[seq.seq_id] = _SeqOutput(detok, [] if params.logprobs is not None else None, holdback)

    def process_token(self, seq: Sequence, token: int, logprobs: SampledLogprobs | None, now: float) -> str | None:
        """Account for a token the scheduler has just appended; return why the sequence stops
        ("stop" or "length"), or None while it goes on."""
        request = seq.request
        self.count_tokens(request, 1, now)
        state = self._seqs[seq.seq_id]
        params = request.params
        if state.logprobs is not None and logprobs is not None:
            state.logprobs.append(self._token_logprob(token, params.logprobs, logprobs))
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in request.eos_token_ids):
            reason = "stop"
        elif len(seq.token_ids) >= request.max_total_tokens:  # max_tokens, or the context's end
            reason = "length"
        det = state.detokenizer
        if det is not None:
            det.add(token)
            if reason is not None:
                det.flush()
            if params.stop:
                stop_at = _find_stop(det.text, params.stop, det.text_len - state.visible_text_len)
                if stop_at is not None:
                    det.truncate(stop_at)
                    reason = "stop"
            holdback = 0 if reason else state.stop_holdback
            state.visible_text_len = max(state.visible_text_len, det.text_len - holdback)
        return reason

    def count_tokens(self, request: Request, num_tokens: int, now: float) -> None:
        """The stats of tokens that reached the host: `process_token`'s, and a beam step's."""
        if request.first_token_time is None:
            request.first_token_time = now
            self.prompt_tokens_total += len(request.prompt_token_ids)
        self.generation_tokens_total += num_tokens

    def output(self, request: Request) -> RequestOutput | None:
        """The request's output after this step, as its `output_kind` asks (None: nothing to
        hand out yet, for FINAL_ONLY before the end)."""
        kind = request.params.output_kind
        finished = request.finished
        if kind is OutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is OutputKind.DELTA
        outs = []
        for s in request.sequences:
            state = self._seqs[s.seq_id]
            det = state.detokenizer
            text_from = state.sent_text_len if delta else 0
            tokens_from = state.sent_tokens if delta else 0
            text = det.text[text_from : state.visible_text_len] if det else ""
            token_ids = s.token_ids[s.num_prompt_tokens + tokens_from :]
            logprobs = state.logprobs[tokens_from:] if state.logprobs is not None else None
            state.sent_text_len = state.visible_text_len
            state.sent_tokens = s.num_output_tokens
            outs.append(CompletionOutput(s.index, text, token_ids, s.finish_reason, logprobs))
        return RequestOutput(request.request_id, request.prompt_token_ids, outs, finished, request_metrics(request))

    def final_text(self, request: Request, token_ids: list[int]) -> str:
        """The text of a whole output at once, as the incremental path would have made it (a
        beam's, whose sequence may be gone: beam_search.py)."""
        if self.tokenizer is None:
            return ""
        det = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)
        for token in token_ids:
            det.add(token)
        det.flush()
        return det.text

    def release(self, request: Request) -> None:
        """A finished request's final output has been made: forget its sequences."""
        for s in request.sequences:
            self._seqs.pop(s.seq_id, None)

    def _token_logprob(self, token: int, num_top: int, lp: SampledLogprobs) -> TokenLogprob:
        alternatives = [(t, self._token_text(t), v) for t, v in zip(lp.top_ids[:num_top], lp.top[:num_top])]
        return TokenLogprob(token, self._token_text(token), lp.chosen, alternatives)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""


def request_metrics(request: Request) -> dict[str, float]:
    metrics = {"arrival_time": request.arrival_time}
    if request.first_token_time is not None:
        metrics["first_token_time"] = request.first_token_time
    if request.params.speculative:
        metrics["draft_tokens"] = request.num_draft_tokens
        metrics["accepted_draft_tokens"] = request.num_accepted_tokens
        metrics["verify_steps"] = request.num_verify_steps
    return metrics


def _find_stop(text: str, stops: list[str], new_chars: int) -> int | None:
    """Where the earliest stop string starts, looking only where new text could complete one."""
    if not stops:
        return None
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best):
            best = at
    return best

"""Beam search over shared KV blocks, by transformers' rules (`generate(num_beams=k)`, no sampling).

A request with `beam_width` k runs as a group of at most k live beams, each a `Sequence`. A step
computes every live beam's last token and lands its K likeliest next tokens with their
log-probabilities (the sampler's top-logprobs path: the raw logits' log_softmax, as transformers
scores them), K = max(2, 1 + number of stop ids) * k so that k candidates that do not stop always
remain. Once all of a group's beams have landed, the group chooses, as transformers does:

- the K best continuations over all beams by accumulated log-probability;
- those among the first k that end in a stop token (or reach max_tokens) become finished
  hypotheses, scored sum_logprobs / len**length_penalty (len counts the stop token); the best
  k hypotheses are kept;
- the k best that do not stop are the next step's beams;
- the search ends at max_tokens; with early_stopping True once k hypotheses are finished; else
  once k are finished and the best running beam, length-penalised at the current length (for
  "never" with a positive penalty, at max_tokens), does not beat the worst of them.

The blocks are shared: the request's one sequence prefills the prompt once and is the first beam
(transformers' k-1 other start beams score -1e9 and never win the first step). A beam chosen c
times continues with one choice while c-1 beams fork from it (`Scheduler.fork`: they hold all its
blocks by reference, and the partial last block is copied when first written); a beam chosen 0
times is finished, its blocks back in the pool at once. So this module decides which beams live
and asks the scheduler to fork, extend and finish them: the scheduler still writes
`num_computed_tokens` and appends tokens, and the KV manager frees blocks.

A beam request hands out one output, when it finishes: its `n` best hypotheses, best first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from .errors import RequestError
from .output_processor import OutputProcessor, SampledLogprobs, request_metrics
from .outputs import CompletionOutput, RequestOutput
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus

_log = logging.getLogger(__name__)


def stop_ids(request: Request) -> frozenset[int]:
    """The tokens that end a beam: transformers' eos_token_id."""
    params = request.params
    ids = frozenset(params.stop_token_ids)
    return ids if params.ignore_eos else ids | request.eos_token_ids


def num_candidates(request: Request) -> int:
    """How many continuations a beam lands per step, and a group keeps: transformers' K."""
    return max(2, 1 + len(stop_ids(request))) * request.params.beam_width


@dataclass(slots=True)
class Hypothesis:
    token_ids: list[int]  # generated, the stop token included
    cumulative_logprob: float
    score: float
    finish_reason: str


@dataclass(slots=True, eq=False)
class Beam:
    seq: Sequence
    logprob: float = 0.0  # accumulated over its generated tokens


@dataclass(slots=True, eq=False)
class Choice:
    parent: Beam
    token: int
    logprob: float  # the parent's, plus this token's


@dataclass(slots=True, eq=False)
class BeamGroup:
    request: Request
    beams: list[Beam]  # live, best first
    stop_ids: frozenset[int]
    num_candidates: int
    max_new_tokens: int  # max_tokens, as far as the context allows
    hypotheses: list[Hypothesis] = field(default_factory=list)  # finished, best first, at most k
    candidates: dict[int, SampledLogprobs] = field(default_factory=dict)  # seq id -> landed this step
    num_generated: int = 0  # tokens each live beam holds past the prompt
    done: bool = False

    @classmethod
    def start(cls, request: Request) -> BeamGroup:
        max_new = request.max_total_tokens - len(request.prompt_token_ids)
        return cls(request, [Beam(request.sequences[0])], stop_ids(request), num_candidates(request), max_new)

    @property
    def ready(self) -> bool:
        """Every live beam has landed its candidates: the group can choose."""
        return all(b.seq.seq_id in self.candidates for b in self.beams)

    def choose(self) -> list[Choice]:
        """One step of the search: update the hypotheses and `done`; return the next beams,
        best first (none once done)."""
        width, k = self.request.params.beam_width, self.num_candidates
        pool = []
        for beam in self.beams:
            lp = self.candidates[beam.seq.seq_id]
            pool += [Choice(beam, t, beam.logprob + v) for t, v in zip(lp.top_ids[:k], lp.top[:k])]
        pool.sort(key=lambda c: -c.logprob)  # stable: a tie keeps the better beam's first
        del pool[k:]
        self.candidates.clear()
        self.num_generated += 1
        at_max = self.num_generated >= self.max_new_tokens
        for c in pool[:width]:
            stops = c.token in self.stop_ids
            if stops or at_max:
                self._add_hypothesis(c, "stop" if stops else "length")
        running = [c for c in pool if c.token not in self.stop_ids][:width]
        self.done = at_max or not self._can_improve(running[0].logprob)
        return [] if self.done else running

    def _add_hypothesis(self, c: Choice, reason: str) -> None:
        tokens = c.parent.seq.output_token_ids + [c.token]
        score = c.logprob / len(tokens) ** self.request.params.length_penalty
        self.hypotheses.append(Hypothesis(tokens, c.logprob, score, reason))
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.request.params.beam_width :]

    def _can_improve(self, best_running: float) -> bool:
        """transformers' stopping rule: can a running beam still enter the k best hypotheses?"""
        params = self.request.params
        if len(self.hypotheses) < params.beam_width:
            return True
        if params.early_stopping is True:
            return False
        never = params.early_stopping == "never" and params.length_penalty > 0
        length = self.max_new_tokens if never else self.num_generated
        return best_running / length**params.length_penalty > self.hypotheses[-1].score


class BeamSearch:
    """The engine's beam groups, and the scheduler calls that carry out their choices."""

    def __init__(self, scheduler: Scheduler, outputs: OutputProcessor, seq_ids: Iterator[int], vocab_size: int):
        self.scheduler = scheduler
        self.outputs = outputs
        self.seq_ids = seq_ids  # the engine's: beam sequences are numbered with all the others
        self.vocab_size = vocab_size
        self.groups: dict[str, BeamGroup] = {}

    def check(self, request: Request) -> None:
        """Refuse a beam request this engine could never run, before it takes anything."""
        width = request.params.beam_width
        if width == 1:
            return
        if width > self.scheduler.max_num_seqs:
            raise RequestError(
                f"beam_width is {width} but the engine runs at most {self.scheduler.max_num_seqs} sequences at once (max_num_seqs)"
            )
        k = num_candidates(request)
        if k > self.vocab_size:
            raise RequestError(f"beam_width {width} needs {k} candidates a step but the vocabulary has {self.vocab_size} tokens")
        # Past the prompt's full blocks every beam may hold its own. A search the pool cannot
        # hold whole would have idle beams waiting on a sibling preempted for want of blocks.
        kv = self.scheduler.kv
        shared = len(request.prompt_token_ids) // kv.block_size if kv.pool.enable_caching else 0
        need = shared + width * (kv.blocks_needed(request.max_total_tokens) - shared)
        capacity = kv.pool.num_blocks - kv.num_pinned_blocks
        if need > capacity:
            raise RequestError(
                f"beam_width {width} needs up to {need} KV blocks ({width} beams of up to {request.max_total_tokens} "
                f"tokens sharing the prompt) but the pool has {capacity}; lower beam_width or max_tokens"
            )

    def land(self, seq: Sequence, logprobs: SampledLogprobs) -> None:
        """A beam's candidates reached the host; its group chooses once all its beams have."""
        request = seq.request
        group = self.groups.get(request.request_id)
        if group is None:  # the prompt's first candidates: the search starts from them
            group = self.groups[request.request_id] = BeamGroup.start(request)
        group.candidates[seq.seq_id] = logprobs

    def advance(self, now: float) -> list[RequestOutput]:
        """Let every group whose beams have all landed choose; return the outputs of the beam
        requests that finished. A failure in one group ends that request alone."""
        finished = []
        for group in list(self.groups.values()):
            if not group.candidates or not group.ready:
                continue
            try:
                self.outputs.count_tokens(group.request, len(group.beams), now)
                self._carry_out(group, group.choose())
                out = self._final_output(group) if group.done else None
            except Exception:
                _log.exception("request %s: beam search failed; ending it", group.request.request_id)
                out = self.abort(group.request, "error")
            if out is not None:
                self.groups.pop(group.request.request_id, None)
                finished.append(out)
        return finished

    def _carry_out(self, group: BeamGroup, choices: list[Choice]) -> None:
        """Fork, extend and drop sequences so that the live beams are `choices`."""
        scheduler, request = self.scheduler, group.request
        if group.done:
            for beam in group.beams:
                scheduler.finish(beam.seq, "stop")
            return
        new: dict[int, Beam] = {}  # id(choice) -> its beam
        for beam in group.beams:
            mine = [c for c in choices if c.parent is beam]
            if not mine:  # chosen 0 times: dropped, its blocks (the ones it alone holds) freed now
                scheduler.finish(beam.seq, "stop")
                request.sequences.remove(beam.seq)
                continue
            for c in mine[1:]:
                child = Sequence(next(self.seq_ids), request, list(beam.seq.token_ids))
                request.sequences.append(child)
                if beam.seq.status is SequenceStatus.RUNNING:
                    scheduler.fork(beam.seq, child)
                else:  # the parent was preempted after landing: the child is recomputed too
                    scheduler.add(child)
                scheduler.append_token(child, c.token)
                new[id(c)] = Beam(child, c.logprob)
            scheduler.append_token(beam.seq, mine[0].token)
            new[id(mine[0])] = Beam(beam.seq, mine[0].logprob)
        group.beams = [new[id(c)] for c in choices]

    def _final_output(self, group: BeamGroup) -> RequestOutput:
        request = group.request
        outs = [
            CompletionOutput(
                i, self.outputs.final_text(request, h.token_ids), h.token_ids, h.finish_reason,
                cumulative_logprob=h.cumulative_logprob, score=h.score,
            )
            for i, h in enumerate(group.hypotheses[: request.params.n])
        ]
        return RequestOutput(request.request_id, request.prompt_token_ids, outs, True, request_metrics(request))

    def abort(self, request: Request, reason: str = "abort") -> RequestOutput:
        """End a beam request early: its live beams, best first, as they stand."""
        group = self.groups.pop(request.request_id, None)
        beams = group.beams if group is not None else [Beam(s) for s in request.sequences]
        for seq in request.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq, reason)
        outs = []
        for i, beam in enumerate(beams[: request.params.n]):
            ids = beam.seq.output_token_ids
            text = self.outputs.final_text(request, ids) if reason == "abort" else ""
            outs.append(CompletionOutput(i, text, ids, reason, cumulative_logprob=beam.logprob))
        return RequestOutput(request.request_id, request.prompt_token_ids, outs, True, request_metrics(request))

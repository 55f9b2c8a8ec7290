"""What a request asks the sampler for, and the batched sampler itself.

Every row of a batch carries its own parameters, so greedy, temperature, top-k/top-p and seeded
requests share one step. A seeded row draws its noise from its own generator; that generator
lives on the sequence, so a request preempted and recomputed draws exactly what it would have.

Penalties (presence and frequency as in OpenAI's API, repetition as in vLLM and transformers)
reshape a row's logits from the tokens its sequence already holds, before greedy or sampled
choice alike; those rows carry their token history, which must therefore be on the host.

A beam search request (`beam_width` > 1, beam_search.py) samples nothing: its rows' candidates
come from `Sampler.logprobs`, so its params are checked here to hold no sampling knob it would
silently ignore.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows
MAX_PRESENCE_FREQUENCY = 2.0  # OpenAI's bound on presence and frequency penalties, either sign
MAX_REPETITION_PENALTY = 10.0
# The sampler packs each row's top_k into an int64 tensor; past the vocabulary a top_k is simply
# "off", so any bound between them would do. The server also refuses top_k above the vocabulary.
MAX_TOP_K = 2**31 - 1
# What torch.Generator.manual_seed accepts: int64 and uint64 alike.
SEED_RANGE = (-(2**63), 2**64 - 1)
# Draft tokens a speculative step may verify: its 1 + k tokens stay within the decode graphs'
# chunk of 16 rows (model_runner.GRAPH_MAX_CHUNK), so a verify step replays a graph on CUDA.
MAX_SPECULATIVE = 15


class OutputKind(enum.Enum):
    """What each step's output of a request holds (vLLM's RequestOutputKind). Building every
    running request's cumulative text and token list each step is the largest part of the
    host's update at large batches: a caller that wants only the result asks for FINAL_ONLY,
    a streaming caller for DELTA."""

    CUMULATIVE = "cumulative"  # everything so far, every step
    DELTA = "delta"  # only what is new since the request's last output
    FINAL_ONLY = "final_only"  # one output, when the request finishes


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling settings, named and defaulted as in vLLM so users know them."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (positive) or multiplies (negative) the logits
    # of tokens in the prompt or the output; 1 is off
    logprobs: int | None = None  # each generated token's log-probability and this many alternatives
    output_kind: OutputKind = OutputKind.CUMULATIVE
    # Beam search (transformers' num_beams without sampling): `n` of the `beam_width` best
    # finished beams come back at the end, best first, scored sum(logprobs) / len**length_penalty.
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # False, True or "never", as in transformers
    # Speculative decoding by prompt lookup (speculative.py): up to this many draft tokens,
    # copied from where the text's last few tokens occurred before, verified in one step; 0 is off.
    speculative: int = 0
    # Derived once: the engine asks per sequence per step.
    has_penalties: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        """Refuse any value the sampler cannot represent, so a bad field fails its own request
        here instead of failing the batched step (and every request in it) later."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        _check(
            _is_real(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(
            _is_int(self.top_k) and -1 <= self.top_k <= MAX_TOP_K,
            f"top_k must be -1 or 0 (off) or 1 to {MAX_TOP_K}, got {self.top_k!r}",
        )
        _check(
            self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
            f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids")
        bound = MAX_PRESENCE_FREQUENCY
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_real(value) and -bound <= value <= bound,
                f"{name} must be in [-{bound:g}, {bound:g}], got {value!r}",
            )
        _check(
            _is_real(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}",
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be None or 0 to {MAX_LOGPROBS}, got {self.logprobs!r}",
        )
        _check(isinstance(self.output_kind, OutputKind), f"output_kind must be an OutputKind, got {self.output_kind!r}")
        self.has_penalties = self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
        self._check_beam_search()
        self._check_speculative()

    def _check_beam_search(self) -> None:
        """Beams are ranked by the model's own log-probabilities (the raw logits' log_softmax, as
        transformers scores them), which is temperature 1; temperature 0, greedy's spelling, is
        read the same. What would change the ranking (another temperature, top-p/top-k, penalties)
        or needs per-token text and logprobs of beams that may be dropped (stop strings, logprobs)
        is refused rather than ignored. A seed is accepted and has no effect, as with greedy."""
        _check(_is_int(self.beam_width) and self.beam_width >= 1, f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        _check(_is_real(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty!r}")
        _check(
            isinstance(self.early_stopping, bool) or self.early_stopping == "never",
            f"early_stopping must be true, false or 'never', got {self.early_stopping!r}",
        )
        if self.beam_width == 1:
            _check(
                self.length_penalty == 1.0 and self.early_stopping is False,
                "length_penalty and early_stopping apply to beam search only: set beam_width > 1",
            )
            return
        _check(self.n <= self.beam_width, f"n ({self.n}) must not exceed beam_width ({self.beam_width})")
        _check(
            self.temperature in (0.0, 1.0),
            f"beam search ranks by the model's log-probabilities: temperature must be 0 or 1, got {self.temperature!r}",
        )
        refused = dict(
            top_p=self.top_p < 1.0, top_k=self.top_k > 0, stop=bool(self.stop), logprobs=self.logprobs is not None,
            presence_penalty=self.presence_penalty != 0, frequency_penalty=self.frequency_penalty != 0,
            repetition_penalty=self.repetition_penalty != 1,
        )
        for name, used in refused.items():
            _check(not used, f"{name} is not supported with beam search (beam_width > 1)")
        self.temperature = 0.0  # a beam's row in the sampler is greedy: its sampled token goes unused

    def _check_speculative(self) -> None:
        """A verify step lands up to k + 1 tokens at once; what needs one token's own step is
        refused rather than silently turning speculation off: beam search (its group chooses
        every step) and log-probabilities (reported per sampled row, not per verified draft)."""
        _check(
            _is_int(self.speculative) and 0 <= self.speculative <= MAX_SPECULATIVE,
            f"speculative must be an integer from 0 (off) to {MAX_SPECULATIVE} draft tokens, got {self.speculative!r}",
        )
        if self.speculative:
            _check(self.beam_width == 1, "speculative decoding is not supported with beam search (beam_width > 1)")
            _check(self.logprobs is None, "logprobs are not supported with speculative decoding")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the logits afterwards (log-probabilities, penalties,
        beams): the token alone is the answer, so the logits kernel may return it."""
        return (
            self.greedy and self.n == 1 and self.logprobs is None and not self.has_penalties and self.beam_width == 1
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    """An integer that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float: NaN slips through every range comparison, and inf through most."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None = field(default=None)
    # Only for rows with penalties: the sequence's tokens so far.
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None


class Sampler:
    """Turns one logits row per sampled sequence into one token id per row.

    The result stays on the device and nothing here waits for it: parameters travel in pinned
    memory without blocking, so the engine can launch the next step before these tokens exist.
    """

    @staticmethod
    def select(logits: torch.Tensor, logit_rows: list[int]) -> torch.Tensor:
        """One logits row per sampling row: `logit_rows[i]` is the row sampling row i reads
        (the n > 1 samples of a prompt share one)."""
        return logits[_to_device(logit_rows, torch.int64, logits.device)]

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        logits = adjusted_logits(logits, rows)
        greedy_tokens = _argmax(logits)
        if all(r.params.greedy for r in rows):
            return greedy_tokens
        probs = probabilities(logits, rows)
        # argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race).
        sampled = _argmax(probs / exponential_noise(probs, rows))
        return torch.where(greedy_mask(rows, logits.device), greedy_tokens, sampled)

    @staticmethod
    def logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, num_top: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen tokens' log-probabilities [R] under the model's own distribution (the raw
        logits, before temperature and penalties, as vLLM and OpenAI report them), and the
        `num_top` likeliest tokens [R, num_top] with theirs. On the device, without waiting."""
        logprobs = logits.float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
        return chosen, top_ids, top_logprobs


def adjusted_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The rows' logits in float32 with their penalties applied: what greedy takes the argmax of."""
    logits = logits.float()
    if any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits, rows)
    return logits


def probabilities(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution each sampled row draws from: `adjusted_logits` after temperature, top-k
    and top-p (greedy rows at temperature 1; their probabilities go unused)."""
    temps = _to_device([r.params.temperature or 1.0 for r in rows], torch.float32, logits.device)
    logits = logits / temps.unsqueeze(1)
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _mask_top_k_top_p(logits, top_k, top_p)
    return logits.softmax(dim=-1)


def exponential_noise(like: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Exp(1) noise shaped like `like` [R, ...]; a seeded row draws its own from its generator."""
    noise = torch.empty_like(like).exponential_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    return noise


def greedy_mask(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    return _to_device([r.params.greedy for r in rows], torch.bool, device)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of float32 rows (the first maximum, as torch's). On the CPU through
    numpy: torch's CPU argmax of one 49,152-entry row takes 60-100 us, numpy's about 8, and at
    batch 1 that is a step's largest op after the matmuls."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Presence, frequency and repetition penalties from each row's token history, built as
    per-row token counts over the vocabulary (rows without penalties get neutral values)."""
    num_rows, vocab = logits.shape
    device = logits.device
    output_counts = torch.zeros(num_rows, vocab, device=device)
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if not r.params.has_penalties:
            continue
        out = _to_device(r.output_ids or [], torch.int64, device)
        output_counts[i].index_add_(0, out, torch.ones(out.shape[0], device=device))
        seen[i, _to_device(r.prompt_ids or [], torch.int64, device)] = True
    seen |= output_counts > 0
    presence = _to_device([r.params.presence_penalty for r in rows], torch.float32, device).unsqueeze(1)
    frequency = _to_device([r.params.frequency_penalty for r in rows], torch.float32, device).unsqueeze(1)
    repetition = _to_device([r.params.repetition_penalty for r in rows], torch.float32, device).unsqueeze(1)
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, scaled, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-step tensor, copied to the GPU without a stream synchronisation."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set every logit outside each row's top-k and nucleus to -inf (one sort for both)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = _to_device([kk if kk > 0 else vocab for kk in top_k], torch.int64, logits.device).unsqueeze(1)
    drop = ranks >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    p = _to_device(top_p, torch.float32, logits.device).unsqueeze(1)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already cover p; the top token always stays.
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def make_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """A generator for sample `index` of a seeded request: distinct per sample, fixed per seed."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + index) & 0xFFFF_FFFF_FFFF)
    return gen

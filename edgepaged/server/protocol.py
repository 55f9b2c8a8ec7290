"""The OpenAI wire format the server speaks: request validation and response shapes.

Requests are validated strictly (no "10" for 10, no true for 1) so a client bug is a clear 400
instead of a silent guess, and every sampling field within what the sampler can represent, so
one request's value can never fail a batched step shared with others. Limits an operator
sets (stop strings) arrive as the validation context, a `RequestLimits`. Fields the OpenAI API has but this server cannot honour (logit_bias,
tools, logprobs while streaming) are rejected by name rather than ignored: a client that asks for them must
not get an answer that looks as if they were applied. Unknown fields are ignored, as OpenAI's
own clients send vendor extensions freely.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from edgepaged.outputs import TokenLogprob
from edgepaged.rag.pipeline import Source
from edgepaged.sampling import (
    MAX_LOGPROBS,
    MAX_PRESENCE_FREQUENCY,
    MAX_REPETITION_PENALTY,
    MAX_SPECULATIVE,
    MAX_TOP_K,
    SEED_RANGE,
)

# Fields of the OpenAI API this server does not implement, with the values that mean "off".
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on request fields that cost the engine per step: every stop string is searched
    for in each new piece of text, so their number and length are capped (`serve
    --max-stop-strings`, `--max-stop-chars`)."""

    max_stop_strings: int = 16
    max_stop_chars: int = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat share: the model, sampling knobs and streaming."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-MAX_PRESENCE_FREQUENCY, le=MAX_PRESENCE_FREQUENCY)
    frequency_penalty: float = Field(default=0.0, ge=-MAX_PRESENCE_FREQUENCY, le=MAX_PRESENCE_FREQUENCY)
    # vLLM-style extensions: top_k and repetition_penalty for sampling, ignore_eos for
    # benchmarks with fixed output lengths.
    top_k: int = Field(default=-1, ge=-1, le=MAX_TOP_K)  # -1 or 0: off; the app also bounds it by the vocabulary
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    ignore_eos: bool = False
    # Beam search (docs/beam-search.md): `n` of the beam_width best beams, best first. The
    # engine bounds beam_width by its batch (max_num_seqs) and refuses sampling knobs with it.
    beam_width: int = Field(default=1, ge=1)
    length_penalty: float = Field(default=1.0, allow_inf_nan=False)
    early_stopping: bool | Literal["never"] = False
    # Speculative decoding by prompt lookup (docs/speculative.md): up to this many draft tokens
    # per step, copied from earlier in the prompt or answer; same outputs, fewer steps.
    speculative: int = Field(default=0, ge=0, le=MAX_SPECULATIVE)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None, info: ValidationInfo) -> list[str] | None:
        if stop is None:
            return None
        limits = info.context if isinstance(info.context, RequestLimits) else RequestLimits()
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > limits.max_stop_strings:
            raise ValueError(f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_chars:
            raise ValueError(f"stop strings are limited to {limits.max_stop_chars} characters, got one of {longest}")
        return stops or None

    @model_validator(mode="after")
    def _reject_unsupported(self) -> SamplingRequest:
        for name, value in (self.model_extra or {}).items():
            if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]:
                raise ValueError(f"'{name}' is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        if self.stream and self.beam_width > 1:
            raise ValueError(
                "'stream' is not supported with 'beam_width' > 1: which beams win is known only when "
                "the search ends, so there is nothing to stream before the whole answer"
            )
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_logprobs(self, num_logprobs: int | None) -> None:
        """Each endpoint spells the request its own way (`num_logprobs`: alternatives per token
        when log-probabilities are asked for, else None); neither streams them."""
        if num_logprobs is not None and self.stream:
            raise ValueError("'logprobs' are returned with 'stream': false only")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: one prompt, as text or as token ids.

    OpenAI also accepts a batch of prompts; a batch of one is unwrapped, a larger batch is
    refused so each prompt is its own request (and its own 429 decision).
    """

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the legacy API's alternatives per token

    @model_validator(mode="after")
    def _no_rag(self) -> CompletionRequest:
        # Ignoring it would answer without the documents the client asked for.
        if "rag" in (self.model_extra or {}):
            raise ValueError("'rag' works with /v1/chat/completions only")
        self._check_logprobs(self.num_logprobs)
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def output_limit(self) -> tuple[str, int] | None:
        """The output bound the client sent, with the field it came in."""
        return None if self.max_tokens is None else ("max_tokens", self.max_tokens)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (batched prompts are not supported)")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("the prompt must not be empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_dict(self) -> dict[str, str]:
        """The message as chat templates expect it; 'developer' is OpenAI's newer 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class RagOptions(BaseModel):
    """The `rag` extension: answer from a collection the server was started with (`--rag`).

    Unknown keys are refused, unlike at the top level: a misspelt `top_k` silently ignored
    would change which passages the answer comes from.
    """

    model_config = ConfigDict(strict=True, extra="forbid")
    collection: str = Field(min_length=1)
    # Bounded so one request cannot make the server tokenize a whole corpus into one prompt.
    top_k: int = Field(default=4, ge=1, le=32)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions; `max_completion_tokens` is OpenAI's newer name for max_tokens."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    rag: RagOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _rag_needs_a_question(self) -> ChatCompletionRequest:
        if self.rag is not None and not self.rag_question:
            raise ValueError("with 'rag', the last user message is the question: send one that is not empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        self._check_logprobs(self.num_logprobs)
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def output_limit(self) -> tuple[str, int] | None:
        """The output bound the client sent, with the field it came in (the newer name wins)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return None if self.max_tokens is None else ("max_tokens", self.max_tokens)

    @property
    def rag_question(self) -> str:
        """The text of the last user message ('' if there is none): what a RAG request retrieves for."""
        users = [m for m in self.messages if m.role == "user"]
        return users[-1].as_template_dict()["content"].strip() if users else ""


# ---------------------------------------------------------------------------------------------
# Responses. Built once per answer or chunk and dumped to JSON; `exclude_none` is not used so
# fields OpenAI always sends (finish_reason: null while streaming) are present.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token starts in the choice's text

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> CompletionLogprobs:
        offsets = list(itertools.accumulate((len(e.token) for e in entries[:-1]), initial=0)) if entries else []
        return cls(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{text: lp for _, text, lp in e.top} for e in entries],
            text_offset=offsets,
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _WithRagSources(BaseModel):
    """Adds `rag_sources` to a chat answer or chunk, after OpenAI's fields, and leaves it out
    where it is None, so a client that never asked for RAG sees exactly OpenAI's shape."""

    rag_sources: list[Source] | None = None

    @model_serializer(mode="wrap")
    def _sources_last_or_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        sources = data.pop("rag_sources", None)
        if sources is not None:
            data["rag_sources"] = sources
        return data


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> ChatLogprobs:
        def top(text: str, lp: float) -> TopLogprob:
            return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

        return cls(
            content=[
                ChatTokenLogprob(
                    token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                    top_logprobs=[top(text, lp) for _, text, lp in e.top],
                )
                for e in entries
            ]
        )


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_WithRagSources):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(_WithRagSources):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgepaged"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail

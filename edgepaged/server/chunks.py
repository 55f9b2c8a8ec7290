"""The JSON of a streamed text chunk, written by hand: the one body the server sends per token.

At 16 streams of ~900 tokens/s each, building a pydantic chunk and dumping it for every token
was a large share of the event loop's work, which shares the GIL with the engine thread. A
chunk differs from the stream's previous one only in its choices, so the part around them is
dumped by pydantic once per request (the response models in protocol.py stay the one
definition of the wire format) and each token only encodes its text into a template. The
templates write exactly what `model_dump_json` writes for the same chunk
(tests/test_server_streaming.py compares them byte for byte); rarer chunks (the opening, usage,
the one carrying RAG sources) still go through pydantic.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

# What pydantic writes for a str: UTF-8 as is, only quotes, backslashes and control
# characters escaped. (A str argument takes the encoder's C fast path.)
_STRING = json.JSONEncoder(ensure_ascii=False).encode

# One choice's new text: (choice index, text, finish reason or None).
Delta = tuple[int, str, str | None]


def _nullable(value: str | None) -> str:
    return "null" if value is None else _STRING(value)


def completion_choice(index: int, text: str, finish: str | None) -> str:
    """protocol.CompletionChoice without log-probabilities (they are never streamed)."""
    return f'{{"index":{index},"text":{_STRING(text)},"finish_reason":{_nullable(finish)},"logprobs":null}}'


def chat_choice(index: int, text: str, finish: str | None) -> str:
    """protocol.ChatChunkChoice with a content delta; empty text is a null content, as the
    routes build it (a chunk that only says why the choice finished)."""
    content = _STRING(text) if text else "null"
    return (
        f'{{"index":{index},"delta":{{"role":null,"content":{content}}},'
        f'"finish_reason":{_nullable(finish)},"logprobs":null}}'
    )


@dataclass(frozen=True, slots=True)
class TextChunks:
    """A stream's text chunks: pydantic's JSON of the chunk before and after its choices, and
    the hand-written JSON of each choice between them."""

    head: str
    tail: str
    choice: Callable[[int, str, str | None], str]

    @classmethod
    def around(cls, empty: str, choice: Callable[[int, str, str | None], str]) -> TextChunks:
        """From `empty`, pydantic's JSON of the stream's chunk with no choices (and nothing
        else that changes per token)."""
        head, found, tail = empty.partition('"choices":[]')
        if not found or '"choices":[]' in tail:
            raise ValueError(f"no single empty 'choices' list to write into: {empty[:200]}")
        return cls(head + '"choices":[', "]" + tail, choice)

    def __call__(self, deltas: list[Delta]) -> str:
        return self.head + ",".join([self.choice(i, text, finish) for i, text, finish in deltas]) + self.tail

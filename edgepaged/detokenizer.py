"""Incremental detokenization that never emits half a character.

Byte-level BPE splits a multi-byte UTF-8 character across tokens, and SentencePiece tokenizers
drop a word's leading space when it is decoded alone. Both are handled by decoding with a few
tokens of left context and emitting only once the text no longer ends in U+FFFD.

This runs for every sampled token, on the engine thread, between GPU steps, so it is the
largest part of the host's update at large batches. A fast tokenizer decodes through the Rust
`DecodeStream` (one call per token, the window kept on the Rust side) primed with the prompt's
last tokens; any other tokenizer through a window of token ids decoded from Python. The text
is kept as a list of pieces and joined only when read: appending to one growing string copies
it every token.
"""

from __future__ import annotations

_PROMPT_CONTEXT = 6  # prompt tokens kept as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._backend = _backend(tokenizer)
        self._stream = _decode_stream(self._backend, context, skip_special_tokens)
        self._pieces: list[str] = []
        self._text: str | None = ""  # the joined pieces, None when a piece came since
        self.text_len = 0
        # The window: tokens[prefix_offset:read_offset] decoded is the text already emitted
        # from them (the Python path; with a stream, only flush reads it).
        self.tokens = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._prefix_text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._pieces)
            self._pieces = [self._text]
        return self._text

    def truncate(self, length: int) -> None:
        """Cut the text at `length` (a stop string starts there)."""
        self._text = self.text[:length]
        self._pieces = [self._text]
        self.text_len = len(self._text)

    def _emit(self, delta: str) -> str:
        self._pieces.append(delta)
        self._text = None
        self.text_len += len(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id)
            if delta is None:
                return ""
            self.prefix_offset = self.read_offset = len(self.tokens)
            return self._emit(delta) if delta else ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        prefix = self._prefix_text
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self._prefix_text = None
            return self._emit(full[len(prefix) :])
        return ""

    def flush(self) -> str:
        """At the end, emit whatever is pending even if it is an incomplete character."""
        if self.read_offset == len(self.tokens):
            return ""
        # With a stream, the tokens after the last emission are decoded here with the window's
        # left context, as the Python path does.
        start = max(0, self.read_offset - _PROMPT_CONTEXT) if self._stream is not None else self.prefix_offset
        prefix = self._decode(self.tokens[start : self.read_offset])
        full = self._decode(self.tokens[start:])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        return self._emit(delta) if delta else ""


def _backend(tokenizer):
    """The Rust tokenizer behind a transformers fast tokenizer, where decoding through it gives
    the same text (no clean-up pass of the wrapper's own); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


def _decode_stream(backend, context: list[int], skip_special_tokens: bool):
    """A Rust DecodeStream primed with `context`, or None where this tokenizers release has
    none (or cannot prime one: `ids` came in 0.22)."""
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
    except (ImportError, TypeError):
        return None

"""Incremental detokenization that never emits half a character.

Byte-level BPE splits a multi-byte UTF-8 character across tokens, and SentencePiece tokenizers
drop a word's leading space when it is decoded alone. Decoding a small window that starts a few
tokens back, and only emitting once the window no longer ends in U+FFFD, handles both.

This runs for every sampled token, on the engine thread, between GPU steps: a fast tokenizer
is decoded through its Rust backend directly (the Python wrapper costs five times the decode
itself), and the window's left part is decoded once per emission, not once per token.
"""

from __future__ import annotations

_PROMPT_CONTEXT = 6  # prompt tokens kept as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = _backend(tokenizer)
        self.tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._prefix_text: str | None = None  # the decoded tokens[prefix_offset:read_offset]
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        prefix = self._prefix_text
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self._prefix_text = None
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end, emit whatever is pending even if it is an incomplete character."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.text += delta
        return delta


def _backend(tokenizer):
    """The Rust tokenizer behind a transformers fast tokenizer, where decoding through it gives
    the same text (no clean-up pass of the wrapper's own); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend

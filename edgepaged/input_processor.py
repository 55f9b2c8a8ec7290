"""What a request brings in, checked before it takes anything: prompt text or ids, chat
messages, and whether prompt and output can ever fit the context and the pool."""

from __future__ import annotations

from typing import Sequence

from .cache import KVCacheManager
from .errors import RequestError
from .sampling import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, model_name: str, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"model {self.model_name} has no chat template; send a plain prompt")
        # Sanitising keeps role tokens typed by a user (or found in a RAG document) from acting as roles.
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
        )
        return list(ids)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            if self.tokenizer is None:
                raise RequestError(f"model {self.model_name} has no tokenizer: pass the prompt as token ids")
            return list(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def check(self, ids: list[int], params: SamplingParams, kv: KVCacheManager) -> int:
        """Refuse a request that could never run; return its most tokens, prompt included."""
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model folder has none")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        capacity = kv.pool.num_blocks - kv.num_pinned_blocks
        if kv.blocks_needed(total) > capacity:
            raise RequestError(
                f"the request needs {kv.blocks_needed(total)} KV blocks ({total} tokens) but the pool "
                f"has {capacity}; shorten the prompt or max_tokens, or give the KV cache more memory"
            )
        return total

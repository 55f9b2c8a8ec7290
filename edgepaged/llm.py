"""The offline front: `LLM(...).generate(prompts, params)`, shaped like vLLM's."""

from __future__ import annotations

import itertools
from typing import Sequence

from .engine import LLMEngine
from .outputs import EngineStats, RequestOutput
from .sampling import SamplingParams


class LLM:
    def __init__(
        self,
        model: str | None = None,
        profile: str = "cpu",
        max_kv_blocks: int | None = None,
        backend: str | None = None,
    ):
        self.llm_engine = LLMEngine.from_model(model, profile, max_kv_blocks=max_kv_blocks, backend=backend)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def stats(self) -> EngineStats:
        return self.llm_engine.stats()

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; results in prompt order.

        A single string or a single list of token ids counts as one prompt. Every prompt is
        validated before any is queued, so a bad one refuses the call without leaving work behind.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = [self.llm_engine.encode(p) for p in prompts]
        request_ids = [f"offline-{next(self._ids)}" for _ in ids]
        added = []
        try:
            for rid, prompt_ids in zip(request_ids, ids):
                self.llm_engine.add_request(rid, prompt_ids, params)
                added.append(rid)
        except Exception:
            for rid in added:
                self.llm_engine.abort_request(rid)
            raise
        final = self.llm_engine.run_to_completion(request_ids)
        return [final[rid] for rid in request_ids]

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.llm_engine.apply_chat_template(messages)], params)[0]

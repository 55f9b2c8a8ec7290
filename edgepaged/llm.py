"""The offline front: `LLM(...).generate(prompts, params)`, shaped like vLLM's, and the engine
of a one-shot command, sized to the job it runs."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Sequence

from .engine import LLMEngine, config_from_profile
from .models.loader import display_name, resolve_model
from .outputs import EngineStats, RequestOutput
from .profiles import DeviceProfile, load_profile
from .sampling import OutputKind, SamplingParams


def engine_for_job(
    model: str | Path | None,
    profile: str | Path | DeviceProfile,
    *,
    max_request_tokens: int,
    max_num_seqs: int = 1,
    backend: str | None = None,
) -> LLMEngine:
    """An engine for `max_num_seqs` requests of at most `max_request_tokens` each (prompt plus
    answer), with a KV pool of exactly that many blocks.

    A server sizes its pool from the whole budget because it cannot know its traffic; a command
    that knows its requests (`generate`, `rag ask`) would otherwise zero gigabytes of KV cache it
    never touches: 3.7 GB of resident memory for the 135M model under the cpu profile, against
    a few MB for one answer. The context, the batch and the profile run shrink with the pool,
    and the plan still checks the job against the profile's budget.
    """
    prof = load_profile(profile)
    folder = resolve_model(model)
    config = config_from_profile(prof, backend=backend)
    tokens = min(max_request_tokens, config.max_model_len)
    config = dataclasses.replace(
        config,
        max_model_len=tokens,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=min(config.max_num_batched_tokens, max_num_seqs * tokens),
        num_kv_blocks=max_num_seqs * -(-tokens // config.block_size),
    )
    return LLMEngine(folder, config, prof, model_name=display_name(model, folder))


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
        # Only the finished outputs are returned: the steps in between need build none.
        params = dataclasses.replace(params or SamplingParams(), output_kind=OutputKind.FINAL_ONLY)
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

    def beam_search(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        beam_width: int,
        max_tokens: int = 16,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        ignore_eos: bool = False,
    ) -> list[RequestOutput]:
        """Beam search each prompt (transformers' `generate(num_beams=beam_width)` without
        sampling); each result holds all `beam_width` finished beams, best first, with their
        `score` and `cumulative_logprob`. The prompts run in one batch beside each other."""
        params = SamplingParams(
            n=beam_width, beam_width=beam_width, temperature=0.0, max_tokens=max_tokens,
            length_penalty=length_penalty, early_stopping=early_stopping, ignore_eos=ignore_eos,
        )
        return self.generate(prompts, params)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.llm_engine.apply_chat_template(messages)], params)[0]

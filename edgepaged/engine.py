"""The engine loop: requests in, one scheduler step at a time, outputs out.

A step is vLLM v1's three calls: the scheduler decides (scheduler.py), the step pipeline
executes and lands sampled tokens (overlap.py), and the scheduler and the output processor
update from them (output_processor.py). `LLMEngine` holds the wiring and this loop, synchronous
and single-threaded on purpose; the offline `LLM` and the server drive it through `add_request`
/ `step` / `abort_request`. A failure processing one request's output ends that request alone.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Iterable, Sequence as Seq

from .backends import load_model
from .beam_search import BeamSearch
from .cache import KVCacheManager
from .config import EngineConfig, config_from_profile
from .errors import RequestError
from .memory.enforce import cap_process_memory
from .memory.planner import MemoryPlan
from .model_runner import ModelRunner
from .models.config import ModelConfig
from .models.loader import display_name, generation_eos_ids, load_tokenizer, resolve_model
from .input_processor import InputProcessor
from .output_processor import OutputProcessor
from .outputs import EngineStats, RequestOutput
from .overlap import LandedToken, StepPipeline
from .planning import plan_for
from .profiles import DeviceProfile, load_profile
from .sampling import OutputKind, Sampler, SamplingParams, make_generator
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Request, Sequence, SequenceStatus

_log = logging.getLogger(__name__)


class LLMEngine:
    """One model, one fixed KV pool, one scheduler.

    With a device profile the pool is sized by the memory plan (weights and the activation peak
    measured here, then what the budget leaves); `config.num_kv_blocks` caps it, and without a
    profile it is the pool size itself.
    """

    def __init__(self, folder: Path, config: EngineConfig, profile: DeviceProfile | None = None, model_name: str | None = None):
        self.folder = folder
        self.model_config = ModelConfig.from_folder(folder)
        self.config = config
        self.profile = profile
        self.model_name = model_name or folder.name
        self.tokenizer = load_tokenizer(folder)
        self.max_model_len = min(config.max_model_len, self.model_config.max_context)
        self.inputs = InputProcessor(self.tokenizer, self.model_name, self.model_config.vocab_size, self.max_model_len)
        self.model, self.backend, self.weights_bytes = load_model(folder, self.model_config, config, profile, self.max_model_len)
        self.runner = ModelRunner(
            self.model, self.backend, config.block_size,
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len, cuda_graphs=config.cuda_graphs,
        )
        self.memory_plan: MemoryPlan | None = None
        num_blocks = config.num_kv_blocks
        if profile is not None:
            self.memory_plan = plan_for(
                self.runner, config, self.model_config, profile,
                weights_bytes=self.weights_bytes, max_model_len=self.max_model_len, cap_blocks=config.num_kv_blocks,
            )
            num_blocks = self.memory_plan.num_blocks
            cap_process_memory(self.memory_plan, config.device)
        if num_blocks is None:
            raise ValueError("without a device profile, EngineConfig.num_kv_blocks must give the pool size")
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.pipeline = StepPipeline(self.runner, Sampler(), config.overlap_steps)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | generation_eos_ids(folder)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids |= {self.tokenizer.eos_token_id}
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.beams = BeamSearch(self.scheduler, self.outputs, self._seq_ids, self.model_config.vocab_size)
        self.peak_blocks_used = self.peak_running = 0

    @classmethod
    def from_model(
        cls, model: str | Path | None = None, profile: str | Path | DeviceProfile = "cpu", max_kv_blocks: int | None = None,
        backend: str | None = None, cuda_graphs: bool | None = None,
    ) -> LLMEngine:
        """Build an engine from a model (None: the default model) and a device profile."""
        prof = load_profile(profile)
        folder = resolve_model(model)
        config = config_from_profile(prof, max_kv_blocks, backend, cuda_graphs)
        return cls(folder, config, prof, model_name=display_name(model, folder))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.inputs.apply_chat_template(messages)

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        return self.inputs.encode(prompt)

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams) -> None:
        """Queue a request, or refuse it with a reason before it takes any resources."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.inputs.encode(prompt)
        total = self.inputs.check(ids, params, self.kv)
        request = Request(request_id, ids, params, total, self.eos_token_ids)
        self.beams.check(request)
        seq = self._new_sequence(request, list(ids), index=0)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _new_sequence(self, request: Request, token_ids: list[int], index: int) -> Sequence:
        seq = Sequence(next(self._seq_ids), request, token_ids, index=index)
        seq.generator = make_generator(request.params.seed, index, self.config.device)
        self.outputs.add_sequence(seq)
        request.sequences.append(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request wherever it is; its blocks go back to the pool at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq, "abort")
        out = self.beams.abort(request) if request.params.beam_width > 1 else self.outputs.output(request)
        self.outputs.release(request)
        return out

    def has_unfinished_requests(self) -> bool:
        """A step left in flight after the last request finished holds only dropped tokens;
        the next step lands it."""
        return bool(self.requests)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, launch and land one step; return the outputs of the tokens that landed
        (with overlapped steps, those of the step before)."""
        sched = self.scheduler.schedule()
        forks = self._fork_samples(sched)
        landed = self.pipeline.step(sched, self.kv, forks)
        self.peak_blocks_used = max(self.peak_blocks_used, self.kv.pool.num_used)
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        return self._update_from_output(landed)

    def _fork_samples(self, sched: SchedulerOutput) -> dict[int, list[Sequence]]:
        """An n > 1 request whose prompt completes this step forks its other samples now: they
        share the prompt's blocks and sample from its logits in this very step."""
        forks: dict[int, list[Sequence]] = {}
        for chunk in sched.chunks:
            request = chunk.seq.request
            if request.needs_fork and chunk.completes_prompt:
                children = [self._new_sequence(request, list(chunk.seq.token_ids), i) for i in range(1, request.params.n)]
                for child in children:
                    self.scheduler.fork(chunk.seq, child)
                forks[chunk.seq.seq_id] = children
        return forks

    def _update_from_output(self, landed: list[LandedToken]) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for item in landed:
            seq = item.seq
            if seq.request.params.beam_width > 1:  # its group chooses its tokens, below
                self.beams.land(seq, item.logprobs)
                continue
            if seq.status is SequenceStatus.FINISHED:  # stopped at an earlier token of its verify step
                continue
            self.scheduler.append_token(seq, item.token, item.verdict)
            try:
                reason = self.outputs.process_token(seq, item.token, item.logprobs, now)
            except Exception:  # one request's text or stop check failed: it alone ends
                _log.exception("request %s: output processing failed; ending it", seq.request.request_id)
                reason = "error"
            if reason is not None:
                self.scheduler.finish(seq, reason)
            request = seq.request
            # A request that hands out only its final output is looked at when a sample ends.
            if reason is not None or request.params.output_kind is not OutputKind.FINAL_ONLY:
                touched[request.request_id] = request
        outputs = self.beams.advance(now)
        for out in outputs:
            self.requests.pop(out.request_id, None)
        for request in touched.values():
            out = self.outputs.output(request)
            if request.finished:
                self.requests.pop(request.request_id, None)
                self.outputs.release(request)
            if out is not None:
                outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        pool = self.kv.pool
        cached = pool.num_cached_free
        return EngineStats(
            num_blocks=pool.num_blocks,
            block_size=self.config.block_size,
            blocks_used=pool.num_used,
            blocks_free=pool.num_free - cached,
            blocks_cached=cached,
            prefix_hit_rate=self.kv.prefix_hit_rate,
            prefix_query_tokens=self.kv.prefix_query_tokens,
            prefix_hit_tokens=self.kv.prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            prompt_tokens_total=self.outputs.prompt_tokens_total,
            generation_tokens_total=self.outputs.generation_tokens_total,
            peak_blocks_used=self.peak_blocks_used,
            peak_running=self.peak_running,
            draft_tokens=self.scheduler.num_draft_tokens,
            accepted_draft_tokens=self.scheduler.num_accepted_tokens,
        )

    def pin_prefix(self, token_ids: Seq[int], owner: str = "") -> int:
        """Compute a hot prefix (if not cached yet) and keep its full blocks out of LRU eviction,
        until `unpin(owner)`."""
        ids = self.encode(token_ids)
        full = (len(ids) // self.config.block_size) * self.config.block_size
        if full == 0:
            return 0
        request_id = f"__pin_{next(self._seq_ids)}"
        self.add_request(request_id, ids[:full], SamplingParams(max_tokens=1, temperature=0.0))
        while request_id in self.requests:
            self.step()
        return self.kv.pin(ids[:full], owner)

    def unpin(self, owner: str = "") -> None:
        self.kv.unpin(owner)

    def unpin_all(self) -> None:
        self.kv.unpin_all()

    def run_to_completion(self, request_ids: Iterable[str]) -> dict[str, RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return final


"""The engine loop: requests in, one scheduler step at a time, outputs out.

`LLMEngine` is synchronous and single-threaded on purpose; the offline `LLM` front and the
server's async front both drive it through `add_request` / `step` / `abort_request`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence as Seq

import torch

from .attention import AttentionBackend
from .cache import KVCacheManager
from .config import DTYPES, EngineConfig
from .errors import RequestError
from .models.config import ModelConfig
from .models.llama import LlamaForCausalLM
from .memory.enforce import cap_process_memory
from .memory.planner import MemoryPlan
from .models.loader import DEFAULT_MODEL, generation_eos_ids, load_tokenizer, resolve_model
from .profiles import DeviceProfile, load_profile
from .models.weights import load_weights
from .model_runner import ModelRunner, TokenFeed
from .planning import plan_for
from .outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from .detokenizer import IncrementalDetokenizer
from .sampling import Sampler, SamplingParams, SamplingRow, make_generator
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Request, Sequence, SequenceStatus


def make_backend(name: str, cfg: ModelConfig) -> AttentionBackend:
    args = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    if name == "torch":
        from .backends.torch_ref import TorchRefBackend

        return TorchRefBackend(*args)
    if name == "triton":
        from .backends.triton import TritonBackend

        return TritonBackend(*args)
    raise ValueError(f"unknown attention backend {name!r}; choose torch, triton or tensorrt")


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
        if config.backend == "tensorrt":
            if profile is None:
                raise ValueError("the tensorrt backend builds its engine for a device profile; pass one")
            from .backends.tensorrt.runtime import load_tensorrt_model

            self.model, self.backend = load_tensorrt_model(folder, profile, config.device)
            # The engine's weights live outside torch, where the planner counts them as overhead.
            self.weights_bytes = self.model.resident_bytes
        else:
            self.backend = make_backend(config.backend, self.model_config)
            self.model = LlamaForCausalLM(self.model_config, self.backend, config.dtype, config.device, self.max_model_len)
            self.weights_bytes = load_weights(self.model, folder)
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
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | generation_eos_ids(folder)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids |= {self.tokenizer.eos_token_id}
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.peak_blocks_used = 0
        self.peak_running = 0
        self._in_flight: _StepInFlight | None = None

    @classmethod
    def from_model(
        cls,
        model: str | Path | None = None,
        profile: str | Path | DeviceProfile = "cpu",
        max_kv_blocks: int | None = None,
        backend: str | None = None,
        cuda_graphs: bool | None = None,
    ) -> LLMEngine:
        """Build an engine from a model (None: the default model) and a device profile."""
        prof = load_profile(profile)
        folder = resolve_model(model)
        config = config_from_profile(prof, max_kv_blocks, backend, cuda_graphs)
        return cls(folder, config, prof, model_name=_display_name(model, folder))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"model {self.model_name} has no chat template; send a plain prompt")
        # Sanitising keeps role tokens typed by a user (or found in a RAG document) from acting as roles.
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
        )
        return list(ids)

    # -- requests ----------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            if self.tokenizer is None:
                raise RequestError(f"model folder {self.folder} has no tokenizer: pass the prompt as token ids")
            return list(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams) -> None:
        """Queue a request, or refuse it with a reason before it takes any resources."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model folder has none")
        ids = self.encode(prompt)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        capacity = self.kv.pool.num_blocks - self.kv.num_pinned_blocks
        if self.kv.blocks_needed(total) > capacity:
            raise RequestError(
                f"the request needs {self.kv.blocks_needed(total)} KV blocks ({total} tokens) but the pool "
                f"has {capacity}; shorten the prompt or max_tokens, or give the KV cache more memory"
            )
        request = Request(request_id, ids, params, total, self.eos_token_ids)
        seq = self._new_sequence(request, list(ids), index=0)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _new_sequence(self, request: Request, token_ids: list[int], index: int) -> Sequence:
        seq = Sequence(next(self._seq_ids), request, token_ids, index=index)
        seq.generator = make_generator(request.params.seed, index, self.config.device)
        if request.params.logprobs is not None:
            seq.logprobs = []
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)
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
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        """A step left in flight after the last request finished holds only dropped tokens;
        the next step lands it."""
        return bool(self.requests)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch one scheduled step; return the outputs of the tokens that landed.

        Overlapping (`EngineConfig.overlap_steps`), a step is launched before the previous
        step's tokens are read: its sequences take those tokens from the device, and the host
        reads them, appends, detokenizes and checks stops while the GPU runs the new step. A
        sequence that stopped on a token read late has computed one token too many; it is dropped.
        """
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if sched.chunks else None
        outputs = self._land(self._in_flight) if self._in_flight is not None else []
        self._in_flight = launched
        if launched is not None and (not self.config.overlap_steps or launched.needs_history):
            self._in_flight = None
            outputs += self._land(launched)
        return outputs

    def _launch(self, sched: SchedulerOutput) -> _StepInFlight | None:
        flight = self._in_flight
        feed = TokenFeed(flight.tokens, flight.rows) if flight is not None else None
        result = self.runner.execute(sched, self.kv, feed)
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.kv.commit(chunk.seq)
        self.peak_blocks_used = max(self.peak_blocks_used, self.kv.pool.num_used)
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        if result.logits is None:
            return None
        seqs, rows = [], []
        for row, chunk in enumerate(result.sampled):
            seq = chunk.seq
            seqs.append(seq)
            rows.append(row)
            request = seq.request
            if request.needs_fork:
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, list(seq.token_ids), index)
                    child.num_computed_tokens = seq.num_computed_tokens
                    self.kv.fork(seq, child)
                    self.scheduler.add_running(child)
                    seqs.append(child)
                    rows.append(row)
        logits = result.logits if len(rows) == len(result.sampled) else self.sampler.select(result.logits, rows)
        sampling_rows, num_top, needs_history = [], -1, False
        for seq in seqs:
            params = seq.request.params
            if params.has_penalties:
                # Penalties read the whole history: a step sampling such a row lands before the
                # next one launches (see `step`), so none of its tokens is still on the device.
                assert not seq.num_pending, "a penalised sequence has a token still on the device"
                needs_history = True
                sampling_rows.append(SamplingRow(params, seq.generator, seq.request.prompt_token_ids, seq.output_token_ids))
            else:
                sampling_rows.append(SamplingRow(params, seq.generator))
            if seq.logprobs is not None:
                num_top = max(num_top, params.logprobs)
            seq.num_pending += 1
        tokens = self.sampler(logits, sampling_rows)
        to_host = [tokens]
        if num_top >= 0:
            to_host += self.sampler.logprobs(logits, tokens, num_top)
        return _StepInFlight(
            seqs, tokens, _ToHost(to_host), {s.seq_id: i for i, s in enumerate(seqs)}, needs_history
        )

    def _land(self, flight: _StepInFlight) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for that step only) and apply them."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        tokens, *logprobs = flight.host.values()
        for row, (seq, token) in enumerate(zip(flight.seqs, tokens)):
            seq.num_pending -= 1
            if seq.status is SequenceStatus.FINISHED:
                continue  # stopped or aborted while this step ran: its token is dropped
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
                self.prompt_tokens_total += len(request.prompt_token_ids)
            if seq.logprobs is not None:
                seq.logprobs.append(self._token_logprob(token, request.params.logprobs, row, *logprobs))
            self._append_token(seq, token)
            touched[request.request_id] = request
        outputs = [self._output(request) for request in touched.values()]
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def _token_logprob(
        self, token: int, num_top: int, row: int, chosen: list[float], top_ids: list[list[int]], top: list[list[float]]
    ) -> TokenLogprob:
        alternatives = [(t, self._token_text(t), lp) for t, lp in zip(top_ids[row][:num_top], top[row][:num_top])]
        return TokenLogprob(token, self._token_text(token), chosen[row], alternatives)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        if seq.status is SequenceStatus.RUNNING:
            self.kv.commit(seq)  # a block the step in flight completes can be indexed now
        params = seq.request.params
        reason = None
        if seq.detokenizer is not None:
            seq.detokenizer.add(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in seq.request.eos_token_ids):
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= seq.request.max_total_tokens:
            reason = "length"
        det = seq.detokenizer
        if det is not None:
            if reason is not None:
                det.flush()
            stop_at = _find_stop(det.text, params.stop, len(det.text) - seq.visible_text_len)
            if stop_at is not None:
                det.text = det.text[:stop_at]
                reason = "stop"
            holdback = 0 if reason else max((len(s) for s in params.stop), default=1) - 1
            seq.visible_text_len = max(seq.visible_text_len, len(det.text) - holdback)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _output(self, request: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index,
                text=s.detokenizer.text[: s.visible_text_len] if s.detokenizer else "",
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
            )
            for s in request.sequences
        ]
        metrics = {"arrival_time": request.arrival_time}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        return RequestOutput(request.request_id, request.prompt_token_ids, outs, request.finished, metrics)

    # -- introspection -----------------------------------------------------------------------
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
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            peak_blocks_used=self.peak_blocks_used,
            peak_running=self.peak_running,
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


def config_from_profile(
    profile: DeviceProfile, max_kv_blocks: int | None = None, backend: str | None = None, cuda_graphs: bool | None = None
) -> EngineConfig:
    kind = profile.device.kind
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"profile {profile.name!r} is for a CUDA GPU and none is available here; use --profile cpu")
    if profile.kv_dtype != profile.model.dtype:
        raise ValueError(f"profile {profile.name!r}: a KV dtype other than the model dtype is not supported yet")
    return EngineConfig(
        device=torch.device("cuda" if kind == "cuda" else "cpu"),
        dtype=DTYPES[profile.model.dtype],
        backend=backend or profile.backend,
        block_size=profile.kv_cache.block_size,
        num_kv_blocks=max_kv_blocks,
        max_model_len=profile.scheduler.max_model_len,
        max_num_seqs=profile.scheduler.max_num_seqs,
        max_num_batched_tokens=profile.scheduler.max_num_batched_tokens,
        enable_prefix_caching=profile.scheduler.enable_prefix_caching,
        cuda_graphs=cuda_graphs,
        overlap_steps=profile.scheduler.overlap_steps,
    )


def measure_plan(model: str | Path | None, profile: str | Path | DeviceProfile) -> MemoryPlan:
    """The uncapped memory plan for `model` on this device under `profile` (`edgepaged profile show`)."""
    engine = LLMEngine.from_model(model, profile, max_kv_blocks=1, cuda_graphs=False)
    return plan_for(
        engine.runner, engine.config, engine.model_config, engine.profile,
        weights_bytes=engine.weights_bytes, max_model_len=engine.max_model_len, cap_blocks=None,
    )


def _display_name(model: str | Path | None, folder: Path) -> str:
    return DEFAULT_MODEL if model is None or str(model) in ("", "default", DEFAULT_MODEL) else folder.name


def _find_stop(text: str, stops: list[str], new_chars: int) -> int | None:
    """Where the earliest stop string starts, looking only where new text could complete one."""
    if not stops:
        return None
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best):
            best = at
    return best


class _ToHost:
    """A step's sampled tokens (and their log-probabilities, if asked) on their way to the host.

    The copies are queued right behind the sampler, so reading them waits for that step only,
    not for a step launched after it.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        if tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self._host, tensors):
                host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tensors, None

    def values(self) -> list[list]:
        if self._ready is not None:
            self._ready.synchronize()
        return [t.tolist() for t in self._host]


@dataclass(slots=True)
class _StepInFlight:
    seqs: list[Sequence]  # one per sampled row, forked samples included
    tokens: torch.Tensor  # [len(seqs)] on the device: the next step's inputs
    host: _ToHost
    rows: dict[int, int]  # seq_id -> index in tokens
    needs_history: bool  # a row has penalties: land at once, its next step needs this token

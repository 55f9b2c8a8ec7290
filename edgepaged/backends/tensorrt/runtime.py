"""Run an exported decoder as the model of an `LLMEngine`: same calls, same scheduler, same KV pools.

`ExportedDecoder` has the shape `ModelRunner` drives (`forward(input_ids, positions, kv_caches,
prepared)` and `compute_logits(hidden)`, plus `config` and `embed_tokens`); it does the
embedding lookup and the LM head in torch and hands the layers to a graph executor. `StepPlanner`
stands where an attention backend stands: the engine attends inside the graph, so a step only
needs its metadata in the graph's layout. `TensorRTModel` executes a built engine on the current
CUDA stream with torch tensors' device pointers (`set_tensor_address` + `execute_async_v3`, no
pycuda); the KV pools are the runner's own tensors, bound as engine inputs and, because the
plugin's pool outputs alias its inputs, as the matching outputs too, so they update in place.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ...models.config import ModelConfig
from ...models.loader import resolve_model
from ...attention import AttentionBatch
from . import import_tensorrt
from .build import EngineMeta, build_engine, load_engine
from .export import (
    BLOCK_TABLES,
    CONTEXT_LENS,
    HIDDEN_IN,
    HIDDEN_OUT,
    POSITIONS,
    QUERY_START_LOC,
    SLOT_MAPPING,
    StepInputs,
    k_cache_input,
    k_cache_output,
    step_inputs,
    v_cache_input,
    v_cache_output,
)

KvCaches = list[tuple[torch.Tensor, torch.Tensor]]


class StepPlanner:
    """What `ModelRunner` calls the backend: `prepare` turns a step into the graph's inputs."""

    name = "tensorrt"

    def prepare(self, batch: AttentionBatch) -> StepInputs:
        return step_inputs(batch)


def load_head_weights(
    folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token embedding and (untied models) the LM head, read alone from the checkpoint."""
    from ...models.loader import gguf_source

    names = ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    found: dict[str, torch.Tensor] = {}
    gguf = gguf_source(folder)
    if gguf is not None:  # a GGUF's folder: the file itself, dequantized (the engine's layers are float too)
        from ...quant import GGUFFile

        for t in GGUFFile(gguf).tensors(cfg.num_heads, cfg.num_kv_heads, keep_quantized=False, only=set(names)):
            found[t.name] = t.value.to(device=device, dtype=dtype)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in set(names) & set(f.keys()):
                found[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{folder}: checkpoint does not provide {', '.join(missing)}")
    return found[names[0]], found.get("lm_head.weight")


class ExportedDecoder(nn.Module, ABC):
    """A decoder whose layers run in a graph executor; the embedding and LM head stay here."""

    def __init__(self, config: ModelConfig, embed_tokens: torch.Tensor, lm_head: torch.Tensor | None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(embed_tokens, requires_grad=False)
        self.lm_head = None if lm_head is None else nn.Parameter(lm_head, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KvCaches, prepared: StepInputs) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as `LlamaForCausalLM.forward` returns them."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        return self.run_decoder(hidden, positions.to(torch.int64), kv_caches, prepared)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens if self.lm_head is None else self.lm_head)

    def folds_greedy(self, num_rows: int) -> bool:
        """Never: the LM head runs here in torch, and the fused greedy launch is the CUDA model's
        (LlamaForCausalLM.folds_greedy)."""
        return False

    @property
    def resident_bytes(self) -> int:
        """Device bytes this model holds in torch's allocator before any step runs."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @abstractmethod
    def run_decoder(self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: KvCaches, step: StepInputs) -> torch.Tensor:
        """Run the graph: update every layer's pools in `kv_caches`, return the final hidden states."""


@dataclass(slots=True)
class _Context:
    """One execution context, fixed to one optimization profile, and the pools bound to it."""

    context: object  # tensorrt.IExecutionContext
    max_tokens: int
    bound_pools: tuple[int, ...] = ()


class TensorRTModel(ExportedDecoder):
    """A built engine as the model of an `LLMEngine` (see `load_tensorrt_model`).

    The engine has one optimization profile tuned for decode steps and one for steps with prefill
    chunks; each gets its own execution context, and both share one activation buffer taken from
    torch's allocator (only one runs at a time, on the caller's stream), so the memory plan sees it.
    """

    def __init__(self, engine, meta: EngineMeta, folder: Path, device: torch.device, user_managed_memory):
        """`engine` is a deserialized ICudaEngine built from `folder` (see `load`);
        `user_managed_memory` is TensorRT's ExecutionContextAllocationStrategy.USER_MANAGED."""
        cfg = ModelConfig.from_folder(folder)
        super().__init__(cfg, *load_head_weights(folder, cfg, getattr(torch, meta.dtype), device))
        self.engine = engine
        self.meta = meta
        self.device = device
        stream = torch.cuda.current_stream(device)
        self._scratch = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8, device=device)
        self._contexts = []
        for index in range(engine.num_optimization_profiles):
            context = engine.create_execution_context(user_managed_memory)
            if not context.set_optimization_profile_async(index, stream.cuda_stream):
                raise RuntimeError(f"engine for {meta.model_name}: cannot select optimization profile {index}")
            context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            max_tokens = engine.get_tensor_profile_shape(HIDDEN_IN, index)[2][0]
            self._contexts.append(_Context(context, max_tokens))
        stream.synchronize()

    @classmethod
    def load(cls, engine_dir: Path, folder: Path, device: torch.device) -> TensorRTModel:
        """The engine in `engine_dir`, after checking it was built here for `folder`'s weights."""
        trt = import_tensorrt()
        engine, meta = load_engine(trt, engine_dir, folder)
        return cls(engine, meta, folder, device, trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    @property
    def resident_bytes(self) -> int:
        return super().resident_bytes + self._scratch.numel()

    def _pick(self, num_tokens: int, step: StepInputs) -> _Context:
        """The decode profile's context for decode-only steps it covers, else the mixed one."""
        decode, mixed = self._contexts[0], self._contexts[-1]
        if step.decode_only and num_tokens <= decode.max_tokens:
            return decode
        if num_tokens > mixed.max_tokens:
            raise ValueError(
                f"a step of {num_tokens} tokens exceeds the engine's {mixed.max_tokens} (its profile's max_num_batched_tokens)"
            )
        return mixed

    def _bind(self, ctx: _Context, name: str, tensor: torch.Tensor, is_input: bool = True) -> None:
        context = ctx.context
        if is_input and not context.set_input_shape(name, tuple(tensor.shape)):
            raise ValueError(f"engine input {name}: shape {tuple(tensor.shape)} is outside the engine's optimization profile")
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"engine tensor {name}: TensorRT refused its address")

    def _bind_pools(self, ctx: _Context, kv_caches: KvCaches) -> None:
        """Bind each layer's pools as its input and, aliased, as its output (only when they changed)."""
        pointers = tuple(t.data_ptr() for pair in kv_caches for t in pair)
        if pointers == ctx.bound_pools:
            return
        if any(p % 16 for p in pointers):
            raise ValueError("KV pools must be 16-byte aligned: the plugin kernels are compiled assuming it")
        for layer, (k_cache, v_cache) in enumerate(kv_caches):
            self._bind(ctx, k_cache_input(layer), k_cache)
            self._bind(ctx, k_cache_output(layer), k_cache, is_input=False)
            self._bind(ctx, v_cache_input(layer), v_cache)
            self._bind(ctx, v_cache_output(layer), v_cache, is_input=False)
        ctx.bound_pools = pointers

    def run_decoder(self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: KvCaches, step: StepInputs) -> torch.Tensor:
        ctx = self._pick(hidden.shape[0], step)
        self._bind_pools(ctx, kv_caches)
        # Held in this frame until the step is enqueued: TensorRT keeps only the raw pointers.
        inputs = {
            HIDDEN_IN: hidden.contiguous(),
            POSITIONS: positions.contiguous(),
            SLOT_MAPPING: step.slot_mapping,
            BLOCK_TABLES: step.block_tables,
            CONTEXT_LENS: step.context_lens,
            QUERY_START_LOC: step.query_start_loc,
        }
        for name, tensor in inputs.items():
            self._bind(ctx, name, tensor)
        out = torch.empty_like(inputs[HIDDEN_IN])
        self._bind(ctx, HIDDEN_OUT, out, is_input=False)
        if not ctx.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the step (see its log above)")
        return out


def load_tensorrt_model(model: str | Path | None, profile, device: torch.device) -> tuple[TensorRTModel, StepPlanner]:
    """The engine for `model` under `profile` (built and cached on first use, with its progress
    on stderr) and the planner that goes with it."""
    folder = resolve_model(model)
    engine_dir = build_engine(folder, profile, log=lambda line: print(line, file=sys.stderr))
    return TensorRTModel.load(engine_dir, folder, device), StepPlanner()

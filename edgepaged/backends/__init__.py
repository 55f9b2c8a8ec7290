"""Attention backends behind the one interface of attention.py, chosen by name."""

from __future__ import annotations

from pathlib import Path

import torch

from ..attention import KV_QUANT_DTYPES, AttentionBackend
from ..config import EngineConfig
from ..models.config import ModelConfig
from ..models.llama import LlamaForCausalLM
from ..models.loader import packed_checkpoint
from ..models.weights import load_weights
from ..profiles import DeviceProfile


def make_backend(name: str, cfg: ModelConfig, kv_cache_dtype: str = "auto") -> AttentionBackend:
    """`kv_cache_dtype` "int8" or "fp8_e4m3" gives the backend 8-bit pools (attention.QuantizedCache)."""
    args = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, KV_QUANT_DTYPES.get(kv_cache_dtype))
    if name == "torch":
        from .torch_ref import TorchRefBackend

        return TorchRefBackend(*args)
    if name == "triton":
        from .triton import TritonBackend

        return TritonBackend(*args)
    raise ValueError(f"unknown attention backend {name!r}; choose torch, triton or tensorrt")


def load_model(
    folder: Path, model_config: ModelConfig, config: EngineConfig, profile: DeviceProfile | None, max_model_len: int
) -> tuple[torch.nn.Module, AttentionBackend, int]:
    """The model on its device with its attention backend, and the bytes its weights hold."""
    if config.backend == "tensorrt":
        if profile is None:
            raise ValueError("the tensorrt backend builds its engine for a device profile; pass one")
        from .tensorrt.runtime import load_tensorrt_model

        model, backend = load_tensorrt_model(folder, profile, config.device)
        # The engine's weights live outside torch, where the planner counts them as overhead.
        return model, backend, model.resident_bytes
    backend = make_backend(config.backend, model_config, config.kv_cache_dtype)
    # A GGUF's or GPTQ/AWQ folder's weights are put in place as they are read (dense or packed):
    # none allocated before.
    weights_device = "meta" if packed_checkpoint(folder) else None
    model = LlamaForCausalLM(model_config, backend, config.dtype, config.device, max_model_len, weights_device)
    return model, backend, load_weights(model, folder, keep_quantized=config.quantization == "keep")

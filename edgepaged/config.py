"""The settings one engine runs with, resolved from a device profile, its memory plan and the model.

Every layer below the engine reads this one object; nothing below reads the profile or YAML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .profiles import KV_8BIT_DTYPES, DeviceProfile

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FUSIONS_ENV = "EDGEPAGED_FUSIONS"


@dataclass(frozen=True, slots=True)
class DecodeFusions:
    """Which launch-saving fusions a CUDA decode step runs (kernels/decode_gemv.py); each one can
    be switched off alone so that its gain is measured, not assumed (scripts/check_fusion_gpu.py).

    All but `attn` apply to a one-token step (a batch-1 decode) over dense weights; quantized
    linears keep their own kernels, and what a fusion cannot cover (8-bit KV pools, Qwen3's q/k
    norms, partial rotary) takes the unfused path.
    """

    qkv: bool = True  # (embedding or residual add) + RMSNorm + QKV + rope + KV write: one launch
    # The last split of decode attention merges the others in its launch, no merge kernel (any
    # batch size). Alone it measured 4-6% slower on the H200, yet every fusion together is the
    # fastest configuration measured (docs/benchmarks/fusion-h200-2026-12-03.md); all but this
    # one is not measured yet.
    attn: bool = True
    mlp: bool = True  # residual add + RMSNorm + gate_up + SiLU * up: one launch
    gemv: bool = True  # o_proj and down_proj through the same GEMV kernel instead of cuBLAS
    greedy: bool = True  # lm_head + argmax in one launch when every row is plainly greedy

    @classmethod
    def parse(cls, text: str) -> DecodeFusions:
        """"" or "default" (the defaults above), "all", "none", or a comma-separated list of the
        field names that are on."""
        text = text.strip().lower()
        names = [f for f in cls.__dataclass_fields__]
        if text in ("", "default"):
            return cls()
        wanted = set(names) if text == "all" else set() if text == "none" else {t.strip() for t in text.split(",") if t.strip()}
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"{FUSIONS_ENV}: unknown fusion(s) {sorted(unknown)}; known: default, all, none, {', '.join(names)}")
        return cls(**{name: name in wanted for name in names})

    @classmethod
    def from_env(cls) -> DecodeFusions:
        return cls.parse(os.environ.get(FUSIONS_ENV, "default"))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    device: torch.device
    dtype: torch.dtype
    backend: str
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    cuda_graphs: bool | None = None  # None: on unless EDGEPAGED_CUDA_GRAPHS=0 (triton backend on CUDA only)
    # Launch each step before reading the previous step's tokens, so host work overlaps the GPU.
    # On a CPU the "device" is the host itself, and overlapping only delays every token a step.
    overlap_steps: bool = False
    # A quantized checkpoint (GGUF) runs with its weights packed ("keep") or dequantized to `dtype`.
    quantization: str = "keep"
    # The KV pool's element type: "auto" (the model's dtype) or 8 bits with scales, "int8" or
    # "fp8_e4m3" (attention.QuantizedCache); the torch and triton backends read both.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.quantization not in ("keep", "dequantize"):
            raise ValueError(f"quantization must be keep or dequantize, got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", *KV_8BIT_DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto, int8 or fp8_e4m3, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.backend not in ("torch", "triton"):
            raise ValueError(f"an {self.kv_cache_dtype} KV cache needs the torch or triton backend, not {self.backend}")


def config_from_profile(
    profile: DeviceProfile, max_kv_blocks: int | None = None, backend: str | None = None, cuda_graphs: bool | None = None
) -> EngineConfig:
    kind = profile.device.kind
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"profile {profile.name!r} is for a CUDA GPU and none is available here; use --profile cpu")
    eight_bit = profile.kv_cache.dtype in KV_8BIT_DTYPES
    if profile.kv_dtype != profile.model.dtype and not eight_bit:
        raise ValueError(
            f"profile {profile.name!r}: kv_cache.dtype {profile.kv_dtype} differs from model.dtype; "
            f"use auto, int8 or fp8_e4m3"
        )
    if eight_bit and kind == "cuda":
        profile.check_kv_dtype_on(torch.cuda.get_device_capability(), torch.cuda.get_device_name())
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
        overlap_steps=kind == "cuda" if profile.scheduler.overlap_steps is None else profile.scheduler.overlap_steps,
        quantization=profile.model.quantization,
        kv_cache_dtype=profile.kv_cache.dtype if eight_bit else "auto",
    )

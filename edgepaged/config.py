"""The settings one engine runs with, resolved from a device profile, its memory plan and the model.

Every layer below the engine reads this one object; nothing below reads the profile or YAML.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")

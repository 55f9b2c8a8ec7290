"""Triton kernels for paged attention: one source for the triton backend and the TensorRT plugin.

Every kernel takes plain tensors and integers (see docs/ARCHITECTURE.md, "Kernel contract");
`reference` holds the PyTorch reference of each, used by the tests. `fused` holds the
decoder's elementwise kernels (norm, rope, SiLU), referenced in `fused_reference`.
"""

from .fused import fused_add_rms_norm, rotary_embedding_, silu_and_mul
from .paged_decode import DecodePlan, paged_decode_attention, plan_decode
from .paged_prefill import paged_prefill_attention
from .write_kv import write_kv

__all__ = [
    "DecodePlan",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "plan_decode",
    "rotary_embedding_",
    "silu_and_mul",
    "write_kv",
]

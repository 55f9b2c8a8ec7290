"""Triton kernels for paged attention: one source for the triton backend and the TensorRT plugin.

Every kernel takes plain tensors and integers (see docs/ARCHITECTURE.md, "Kernel contract");
`reference` holds the PyTorch reference of each, used by the tests. `fused` holds the decoder's
elementwise kernels (norm, rope, SiLU), referenced in `fused_reference`; `decode_gemv` the
one-token projections with that elementwise work folded in (batch-1 decode); `quant_matmul`
the weight-only int4/int8 linears (W4A16, W8A16), referenced in `quant_reference`.
"""

from .decode_gemv import ARGMAX, PLAIN, ROPE_KV, SILU_MUL, GemvPrologue, RopeKV, argmax_scratch_for, decode_gemv
from .fused import fused_add_rms_norm, rotary_embedding_, silu_and_mul
from .paged_decode import DecodePlan, paged_decode_attention, plan_decode
from .paged_prefill import paged_prefill_attention
from .quant_matmul import w4a16_linear, w8a16_linear
from .write_kv import write_kv

__all__ = [
    "ARGMAX",
    "PLAIN",
    "ROPE_KV",
    "SILU_MUL",
    "DecodePlan",
    "GemvPrologue",
    "RopeKV",
    "argmax_scratch_for",
    "decode_gemv",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "plan_decode",
    "rotary_embedding_",
    "silu_and_mul",
    "w4a16_linear",
    "w8a16_linear",
    "write_kv",
]

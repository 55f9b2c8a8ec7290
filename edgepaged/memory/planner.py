"""Turn a budget into a KV pool: everything else is subtracted first, the pool gets what remains.

The budget is the smallest of what the profile allows (a fraction of the device, an absolute
cap) and what the device really has now. Weights, the activation peak of the largest step, the
runtime's memory outside the allocator and a safety margin come off it; the KV pool is the
rest, in whole blocks, allocated once and never grown. That order is what keeps an 8 GB box
inside its budget: the pool is the only elastic part, so it is the part that gives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ..attention import KV_QUANT_DTYPES, KV_SCALE_DTYPE
from ..errors import EdgepagedError
from ..profiles import GIB, DeviceProfile
from .probe import DeviceFacts

MIB = 1 << 20

# CUDA context plus torch's kernels as recent drivers load them lazily; used only when the
# device is not here to measure (a plan computed from a profile's figures).
ESTIMATED_CUDA_OVERHEAD_BYTES = 512 * MIB


class MemoryPlanError(EdgepagedError, ValueError):
    """The budget cannot run this model under this profile; the message gives the numbers."""


@dataclass(slots=True, frozen=True)
class MemoryPlan:
    """How a device's budget is spent. All sizes in bytes.

    `activation_bytes` is the allocator's peak above the weights during the largest step (sampler
    workspace and CUDA graph pools included); `overhead_bytes` is the runtime's memory outside
    the caching allocator (CUDA context, library handles). `contiguous_max_seqs` is how many
    sequences a cache reserving `max_model_len` per sequence would hold in the same pool, the
    baseline paging is measured against.
    """

    profile: str
    source: str
    unified: bool
    device_total_bytes: int
    budget_bytes: int
    budget_limited_by: str
    weights_bytes: int
    activation_bytes: int
    overhead_bytes: int
    safety_margin_bytes: int
    kv_pool_bytes: int
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    kv_tokens: int
    max_model_len: int
    max_num_seqs: int
    max_seqs_at_max_len: int
    contiguous_max_seqs: int
    capped_by_max_kv_blocks: bool
    notes: tuple[str, ...] = ()
    # The pool's element type ("int8", "fp8_e4m3", or the model's dtype) and what a 16-bit pool
    # would hold in the same budget, the baseline an 8-bit pool is measured against.
    kv_dtype: str = ""
    kv_bytes_per_token_16bit: int = 0
    kv_tokens_16bit: int = 0
    max_seqs_at_max_len_16bit: int = 0

    @property
    def kv_ratio_vs_16bit(self) -> float:
        """Tokens this budget's pool holds over a 16-bit pool's (block rounding included)."""
        if not self.kv_tokens_16bit:
            return 1.0
        fits = (self.budget_bytes - self._fixed_bytes) // self.block_bytes * self.block_size
        return fits / self.kv_tokens_16bit

    @property
    def _fixed_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.overhead_bytes + self.safety_margin_bytes

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.kv_bytes_per_token

    def to_json(self) -> dict:
        out = asdict(self)
        out["notes"] = list(self.notes)
        out["kv_ratio_vs_16bit"] = round(self.kv_ratio_vs_16bit, 3)
        return out

    def kv_dtype_line(self) -> str:
        """"int8: 1,234 tokens (x1.94 of 16-bit: 636 tokens), 9 seqs at max len (16-bit: 4)"."""
        return (
            f"{self.kv_dtype}: {self.kv_tokens:,} tokens (x{self.kv_ratio_vs_16bit:.2f} of 16-bit: "
            f"{self.kv_tokens_16bit:,} tokens), {self.max_seqs_at_max_len:,} seqs at max len "
            f"(16-bit: {self.max_seqs_at_max_len_16bit:,})"
        )

    def format_table(self) -> str:
        memory = "unified, shared with the OS" if self.unified else "discrete"
        rows = [
            ("profile", self.profile),
            ("device facts", self.source),
            ("device memory", f"{_size(self.device_total_bytes)} ({memory})"),
            ("budget", f"{_size(self.budget_bytes)} (limited by {self.budget_limited_by})"),
            ("  weights", _size(self.weights_bytes)),
            ("  activations", _size(self.activation_bytes)),
            ("  runtime overhead", _size(self.overhead_bytes)),
            ("  safety margin", _size(self.safety_margin_bytes)),
            (
                "  KV pool",
                f"{_size(self.kv_pool_bytes)} = {self.num_blocks:,} blocks x {self.block_size} tokens"
                f" x {self.kv_bytes_per_token:,} B/token" + (" (capped by max_kv_blocks)" if self.capped_by_max_kv_blocks else ""),
            ),
            ("KV tokens", f"{self.kv_tokens:,}"),
            *([("KV cache", self.kv_dtype_line())] if self.kv_dtype else []),
            ("max model len", f"{self.max_model_len:,}"),
            ("max running seqs", f"{self.max_num_seqs:,}"),
            ("seqs at max len", f"{self.max_seqs_at_max_len:,} (paged; shorter sequences take only the blocks they fill)"),
            ("contiguous cache", f"{self.contiguous_max_seqs:,} seqs (each reserves max model len)"),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def plan_memory(
    profile: DeviceProfile,
    facts: DeviceFacts,
    *,
    weights_bytes: int,
    activation_bytes: int,
    overhead_bytes: int,
    kv_bytes_per_token: int,
    max_kv_blocks: int | None = None,
    max_model_len: int | None = None,
    kv_bytes_per_token_16bit: int | None = None,
) -> MemoryPlan:
    """The plan for `profile` on a device described by `facts`.

    `max_model_len` is the model's own limit when it is shorter than the profile's;
    `max_kv_blocks` caps the pool (tests, benchmarks) without changing the budget.
    `kv_bytes_per_token` is the pool's real figure (`kv_token_bytes`: 8-bit codes plus their
    scales); `kv_bytes_per_token_16bit`, the same model's in 16 bits, sizes the comparison.
    """
    if max_kv_blocks is not None and max_kv_blocks < 1:
        raise ValueError(f"max_kv_blocks must be at least 1, got {max_kv_blocks}")
    sched, budget_spec = profile.scheduler, profile.budget
    limits = [(int(budget_spec.fraction * facts.total_bytes), f"fraction {budget_spec.fraction:g} of device memory")]
    if budget_spec.max_gb is not None:
        limits.append((int(budget_spec.max_gb * GIB), f"max_gb {budget_spec.max_gb:g}"))
    limits.append((facts.available_bytes + facts.process_bytes, "memory available now"))
    budget, limited_by = min(limits, key=lambda limit: limit[0])

    margin = int(budget_spec.safety_margin_gb * GIB)
    block_size = profile.kv_cache.block_size
    block_bytes = block_size * kv_bytes_per_token
    fixed = weights_bytes + activation_bytes + overhead_bytes + margin
    need = fixed + sched.max_num_seqs * block_bytes
    if budget < need:
        raise MemoryPlanError(
            f"profile {profile.name}: the budget of {_size(budget)} (limited by {limited_by}) cannot hold "
            f"weights {_size(weights_bytes)} + activations {_size(activation_bytes)} + runtime overhead "
            f"{_size(overhead_bytes)} + safety margin {_size(margin)} + one KV block for each of "
            f"{sched.max_num_seqs} running sequences ({sched.max_num_seqs} x {_size(block_bytes)}) = "
            f"{_size(need)}; short by {_size(need - budget)}. Lower scheduler.max_num_seqs or "
            f"max_num_batched_tokens, pick a smaller model or dtype, or raise the budget."
        )
    max_len = min(sched.max_model_len, max_model_len or sched.max_model_len)
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = (budget - fixed) // block_bytes
    if num_blocks < blocks_per_seq:
        fits = num_blocks * block_size
        raise MemoryPlanError(
            f"profile {profile.name}: the KV pool of {_size(num_blocks * block_bytes)} holds {fits:,} tokens, "
            f"less than one sequence of max_model_len {max_len:,} ({blocks_per_seq} blocks of {block_size}); "
            f"lower scheduler.max_model_len to at most {fits:,} or raise the budget."
        )
    block_bytes_16 = block_size * (kv_bytes_per_token_16bit or kv_bytes_per_token)
    blocks_16 = (budget - fixed) // block_bytes_16
    capped = max_kv_blocks is not None and max_kv_blocks < num_blocks
    if capped:
        num_blocks = max_kv_blocks
    pool = num_blocks * block_bytes
    return MemoryPlan(
        profile=profile.name,
        source=facts.source,
        unified=facts.unified,
        device_total_bytes=facts.total_bytes,
        budget_bytes=budget,
        budget_limited_by=limited_by,
        weights_bytes=weights_bytes,
        activation_bytes=activation_bytes,
        overhead_bytes=overhead_bytes,
        safety_margin_bytes=margin,
        kv_pool_bytes=pool,
        num_blocks=num_blocks,
        block_size=block_size,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_tokens=num_blocks * block_size,
        max_model_len=max_len,
        max_num_seqs=sched.max_num_seqs,
        max_seqs_at_max_len=num_blocks // blocks_per_seq,
        contiguous_max_seqs=pool // (max_len * kv_bytes_per_token),
        capped_by_max_kv_blocks=capped,
        kv_dtype=profile.kv_dtype,
        kv_bytes_per_token_16bit=kv_bytes_per_token_16bit or kv_bytes_per_token,
        kv_tokens_16bit=blocks_16 * block_size,
        max_seqs_at_max_len_16bit=blocks_16 // blocks_per_seq,
    )


class ModelShape(Protocol):
    """The decoder dimensions the activation estimate needs (models.config.ModelConfig has them)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


class KVShape(Protocol):
    num_layers: int
    num_kv_heads: int
    head_dim: int


def dtype_bytes(name: str) -> int:
    return getattr(torch, name).itemsize


def kv_token_bytes(shape: KVShape, kv_dtype: str, model_dtype: str) -> int:
    """K and V bytes one token takes in every layer: `kv_dtype` "auto" is the model's dtype; an
    8-bit pool ("int8", "fp8_e4m3") takes one byte per element plus one KV_SCALE_DTYPE scale per
    (layer, K or V, head). At head dim 64 that is 66 bytes a head against 128 in 16 bits: 1.94x
    the tokens in the same pool."""
    if kv_dtype in KV_QUANT_DTYPES:
        per_head = shape.head_dim * KV_QUANT_DTYPES[kv_dtype].itemsize + KV_SCALE_DTYPE.itemsize
    else:
        per_head = shape.head_dim * dtype_bytes(model_dtype if kv_dtype == "auto" else kv_dtype)
    return 2 * shape.num_layers * shape.num_kv_heads * per_head


def estimate_activation_bytes(shape: ModelShape, profile: DeviceProfile) -> int:
    """Analytic activation peak of the largest step, for when the device is not here to measure it.

    Counts the tensors alive at once in one decoder layer at `max_num_batched_tokens` (the
    residual stream, then the larger of the attention and MLP intermediates) plus the logits
    and sampler rows. Assumes a fused attention kernel (no score matrix) and ignores allocator
    fragmentation, so it is a floor, not a measurement.
    """
    tokens = profile.scheduler.max_num_batched_tokens
    rows = min(profile.scheduler.max_num_seqs, tokens)  # rows that reach the LM head and the sampler
    width = dtype_bytes(profile.model.dtype)
    stream = 2 * tokens * shape.hidden_size * width  # residual + normalised input
    attention = tokens * (2 * shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * width  # q, k, v, out
    mlp = 3 * tokens * shape.intermediate_size * width  # fused gate|up, then their product
    logits = rows * shape.vocab_size * (width + 2 * 4)  # model-dtype logits, float32 copy, probabilities
    return stream + max(attention, mlp) + logits


def _size(n: int) -> str:
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if abs(n) >= 1024 else f"{n} B"

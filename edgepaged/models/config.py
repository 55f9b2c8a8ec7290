"""The shape of a Llama-family checkpoint, read from its config.json.

Only the fields the decoder needs, checked up front, so an unsupported checkpoint fails with a
message instead of a shape error deep inside a matmul.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",  # q/k RMSNorm over the head dim, explicit head_dim
    "Phi3ForCausalLM": "phi3",  # Phi-3/3.5/4-mini: fused qkv and gate_up, partial rotary, longrope
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# Phi-3 checkpoints written before longrope had its name call it "su" or "yarn"; transformers'
# Phi3Config reads both as longrope, and so does this.
_PHI3_ROPE_ALIASES = {"su": "longrope", "yarn": "longrope"}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    qk_norm: bool = False  # Qwen3: RMSNorm over the head dim on q and k, before rope
    partial_rotary_factor: float = 1.0  # Phi-4-mini: rope on the first 0.75 of each head only

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each q/k head that rope rotates (the rest pass through), as
        transformers computes it: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @property
    def max_context(self) -> int:
        """Longest context the weights support exactly (a sliding window caps full attention)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
        raw = json.loads(path.read_text())
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{source}: architecture {archs or raw.get('model_type')!r} is not supported; "
                f"edgepaged runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        kind = SUPPORTED_ARCHITECTURES[arch]
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        rope = _rope_settings(raw, source, kind)
        partial = _partial_rotary_factor(raw, head_dim, source)
        if rope[1] is not None and rope[1]["rope_type"] == "longrope":
            _check_longrope(rope[1], int(head_dim * partial) // 2, source)
        sliding = raw.get("sliding_window")
        if kind in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
            sliding = None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        return cls(
            architecture=kind,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope[0],
            rope_scaling=rope[1],
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bool(raw.get("attention_bias", False)),
            o_bias=kind != "qwen2" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            qk_norm=kind == "qwen3",
            partial_rotary_factor=partial,
        )


_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def _rope_settings(raw: dict[str, Any], source: str, kind: str) -> tuple[float, dict[str, Any] | None]:
    """Rope base and scaling, from either the v4 (`rope_theta`, `rope_scaling`) or v5 layout."""
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or {k: v for k, v in params.items() if k not in _NOT_SCALING} or None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "phi3":
            rope_type = _PHI3_ROPE_ALIASES.get(rope_type, rope_type)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"{source}: rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        scaling = {k: v for k, v in scaling.items() if k not in (*_NOT_SCALING, "type")} | {"rope_type": rope_type}
        if rope_type == "default":
            scaling = None
        elif rope_type == "longrope":
            # Phi-3 keeps the pretraining length beside rope_scaling, and transformers gives that
            # top-level value priority; the default attention factor comes from the length ratio.
            original = raw.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
            scaling["original_max_position_embeddings"] = original or raw.get("max_position_embeddings", 2048)
            scaling["max_position_embeddings"] = raw.get("max_position_embeddings", 2048)
    return float(theta), scaling


def _partial_rotary_factor(raw: dict[str, Any], head_dim: int, source: str) -> float:
    """The fraction of each head rope rotates: top level (v4) or inside rope_parameters (v5)."""
    params = raw.get("rope_parameters") or {}
    factor = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) or 1.0)
    rotary = int(head_dim * factor)
    if not 0 < factor <= 1 or rotary < 2 or rotary % 2:
        raise ModelLoadError(
            f"{source}: partial_rotary_factor {factor} gives {rotary} rotary dims of head_dim {head_dim}; "
            "it must be an even number between 2 and head_dim"
        )
    return factor


def _check_longrope(scaling: dict[str, Any], pairs: int, source: str) -> None:
    """longrope needs a short and a long factor per rotary frequency pair."""
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or len(factors) != pairs:
            got = f"{len(factors)} values" if isinstance(factors, list) else repr(factors)
            raise ModelLoadError(f"{source}: longrope rope scaling needs {key} with {pairs} values (rotary dims / 2), got {got}")

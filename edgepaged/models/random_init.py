"""Random-weight checkpoints in the Hugging Face layout, for tests and speed benchmarks.

Parity tests need logits with clear winners (ties make greedy decoding fragile under
reordered float sums), so weights are drawn wider than the usual 0.02 initialisation.

Each folder gets a small marker file (`RANDOM_WEIGHTS_MARKER`) saying how it was drawn, so a
benchmark run on it can say in its report that the weights were random, without being told.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

RANDOM_WEIGHTS_MARKER = "edgepaged-random-weights.json"


def _longrope_scaling(pairs: int) -> dict[str, Any]:
    """Phi-3.5/Phi-4-mini style longrope: short factors near 1, long ones growing with the
    wavelength (as the released ones do), one per rotary frequency pair."""
    return dict(
        rope_type="longrope",
        short_factor=[round(1.0 + 0.05 * i, 4) for i in range(pairs)],
        long_factor=[round(1.0 + 4.0 * i, 4) for i in range(pairs)],
    )


# Phi3Config's default special ids (32000) lie outside a test vocabulary.
_SMALL_VOCAB_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

SHAPES: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152,
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        vocab_size=128256,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    # Qwen3-0.6B's layout: q/k norms, head_dim set apart from hidden/heads, tied, no qkv bias.
    "tiny-qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    # Phi-3.5-mini's layout: fused qkv/gate_up, full-head rope, longrope, untied, no GQA.
    "tiny-phi3": dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=_longrope_scaling(pairs=8), **_SMALL_VOCAB_IDS,
    ),
    # Phi-4-mini's layout: as Phi-3.5 plus partial rotary (0.75 of each head), GQA, tied.
    "tiny-phi4mini": dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=128, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
        partial_rotary_factor=0.75, rope_scaling=_longrope_scaling(pairs=12), **_SMALL_VOCAB_IDS,
    ),
}


def write_random_model(
    folder: Path,
    shape: str | dict[str, Any] = "tiny-llama",
    vocab_size: int | None = None,
    tokenizer_from: Path | None = None,
    seed: int = 0,
    std: float = 0.08,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Write config.json + model.safetensors + the marker (+ the tokenizer files of `tokenizer_from`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    spec.update(overrides)
    if vocab_size is not None:
        spec["vocab_size"] = vocab_size
    spec.setdefault("vocab_size", 512)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    marker = {
        "shape": shape if isinstance(shape, str) else "custom",
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "std": std,
        "tokenizer_from": tokenizer_from.resolve().name if tokenizer_from is not None else None,
    }
    (folder / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker) + "\n")
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model"):
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder

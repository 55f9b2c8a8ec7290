"""Small random llama checkpoints as GGUF files, for the quantized-weight tests on the CPU
(test_quant.py) and the GPU (test_quant_gpu.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

from edgepaged.models.loader import GGUF_LINK
from edgepaged.quant.gguf import ROPE_FACTOR_TENSORS, gguf_name, write_gguf

T = gguf.GGMLQuantizationType
# Where each K-quant record keeps its float16 super-block scales (the rest is any bytes at all).
_K_QUANT_SCALES = {"Q4_K": ((0, 2e-4), (2, 2e-4)), "Q6_K": ((208, 5e-5),)}

SHAPE = dict(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=512)
RECIPES = {  # tensor kind -> GGUF type; "q4_k_m" mixes formats inside qkv_proj like llama.cpp's
    "q4_0": dict(default="Q4_0", token_embd="Q8_0"),
    "q4_1": dict(default="Q4_1", token_embd="Q8_0"),
    "q8_0": dict(default="Q8_0", token_embd="Q8_0"),
    "q4_k_m": dict(default="Q4_K", attn_v="Q6_K", ffn_down="Q6_K", token_embd="Q6_K"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def gguf_bytes(kind: str, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, K] float weights as GGUF blocks of `kind`. The gguf package quantizes only the simple
    types; K-quant blocks are random bytes with sane super-block scales (any bytes decode)."""
    if kind not in _K_QUANT_SCALES:
        return quantize(weight.astype(np.float32), getattr(T, kind))
    block, record = gguf.GGML_QUANT_SIZES[getattr(T, kind)]
    n, k = weight.shape
    raw = rng.integers(0, 256, (n, k // block, record), dtype=np.uint8)
    for offset, scale in _K_QUANT_SCALES[kind]:
        d = (rng.random((n, k // block)) * scale + scale / 4).astype(np.float16)
        raw[..., offset : offset + 2] = d[..., None].view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def write_gguf_model(folder: Path, recipe: dict[str, str], seed: int = 0, tokenizer_from: Path | None = None,
                     **shape: int) -> Path:
    """A random tied-embedding llama as a GGUF file, with a folder (config.json + gguf.json, and
    the tokenizer files of `tokenizer_from`) for it; `shape` overrides keys of SHAPE."""
    s = SHAPE | shape
    h, inter, heads, kv = s["hidden"], s["inter"], s["heads"], s["kv_heads"]
    head_dim = h // heads
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)

    def blocks(name: str, rows: int, cols: int, kind: str, std: float = 0.08) -> tuple[str, np.ndarray, str]:
        return name, gguf_bytes(kind, rng.standard_normal((rows, cols)) * std, rng), kind

    tensors = [blocks("model.embed_tokens.weight", s["vocab"], h, recipe["token_embd"], std=1.0),
               ("model.norm.weight", np.ones(h, dtype=np.float32), "F32")]
    projections = [("self_attn.q_proj", "attn_q", h, h), ("self_attn.k_proj", "attn_k", kv * head_dim, h),
                   ("self_attn.v_proj", "attn_v", kv * head_dim, h), ("self_attn.o_proj", "attn_output", h, h),
                   ("mlp.gate_proj", "ffn_gate", inter, h), ("mlp.up_proj", "ffn_up", inter, h),
                   ("mlp.down_proj", "ffn_down", h, inter)]
    for i in range(s["layers"]):
        prefix = f"model.layers.{i}"
        tensors += [blocks(f"{prefix}.{name}.weight", rows, cols, recipe.get(kind, recipe["default"]))
                    for name, kind, rows, cols in projections]
        tensors += [(f"{prefix}.{norm}.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")
                    for norm in ("input_layernorm", "post_attention_layernorm")]
    path = write_gguf(folder / "model.gguf", tensors, heads, kv, hf_rows=False)  # random values: drawn as stored
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=inter,
        num_hidden_layers=s["layers"], num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        vocab_size=s["vocab"],
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / GGUF_LINK).write_text(json.dumps({"gguf": str(path), "key": "test"}))
    for name in _TOKENIZER_FILES if tokenizer_from is not None else ():
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def gguf_from_hf_folder(folder: Path, out: Path, recipe: dict[str, str] | None = None) -> Path:
    """The Hugging Face checkpoint in `folder` (a Qwen3 or Phi-3 written by write_random_model)
    as a standalone GGUF file at `out`, tensors and metadata named as llama.cpp's converter names
    them (convert_hf_to_gguf.py: Qwen3Model, Phi3MiniModel): no config.json beside it, so
    loading it reads the model's shape from the file. Matrices are F32 unless `recipe` (as in
    RECIPES) gives their GGUF type; norms and rope factors stay F32."""
    import math

    from safetensors.numpy import load_file

    from edgepaged.models.config import ModelConfig

    cfg = ModelConfig.from_folder(folder)
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights |= load_file(str(file))
    metadata: dict[str, int | float] = {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
        "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "rope.freq_base": cfg.rope_theta,
        "rope.dimension_count": cfg.rotary_dim, "vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:  # the converter writes head_dim when the config has one
        metadata |= {"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim}
    tensors = []
    if cfg.architecture == "phi3":
        scaling = cfg.rope_scaling or {}
        original = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        scale = cfg.max_position_embeddings / original
        metadata |= {"rope.scaling.original_context_length": original, "attention.sliding_window": cfg.sliding_window or 0,
                     "rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0}
        tensors += [(name, np.asarray(scaling[key], dtype=np.float32), "F32")
                    for name, key in ROPE_FACTOR_TENSORS.items() if key in scaling]
    rng = np.random.default_rng(0)
    for name, value in weights.items():
        kind = "F32"
        if recipe is not None and value.ndim == 2:
            kind = recipe.get(gguf_name(name).split(".")[-2], recipe["default"])  # attn_qkv, token_embd, ...
            value = gguf_bytes(kind, value, rng)
        tensors.append((name, value, kind))
    return write_gguf(out, tensors, cfg.num_heads, cfg.num_kv_heads, architecture=cfg.architecture, metadata=metadata)

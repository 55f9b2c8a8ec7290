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
from edgepaged.quant.gguf import write_gguf

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

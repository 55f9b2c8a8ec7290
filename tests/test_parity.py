"""Greedy parity with transformers, token for token, through the whole engine.

Prompts are submitted together so they share steps (continuous batching, chunked prefill);
some share long prefixes so later ones hit the prefix cache; one run uses a pool so small
that sequences are preempted and recomputed.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_engine
from transformers import AutoModelForCausalLM

from edgepaged import SamplingParams
from edgepaged.models.random_init import write_random_model

NEW_TOKENS = 64

VARIANTS = {
    # GQA, untied embeddings, Llama 3.1 rope scaling.
    "llama": dict(
        shape="tiny-llama",
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    # Attention bias on q/k/v, tied embeddings, YaRN rope scaling.
    "qwen2": dict(
        shape=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    ),
    # Mistral with linear rope scaling, GQA 4:2, head_dim smaller than hidden/heads.
    "mistral": dict(
        shape=dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64, intermediate_size=160,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
                   tie_word_embeddings=False),
        rope_scaling=dict(rope_type="linear", factor=2.0),
    ),
}


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(70)]
    lengths = [3, 16, 31, 57, 129, 200]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    prompts += [shared + [rng.randrange(vocab) for _ in range(n)] for n in (5, 21, 40)]
    return prompts


def _reference(folder, prompts: list[list[int]]) -> list[list[int]]:
    from edgepaged.models.loader import gguf_source

    gguf = gguf_source(folder)  # a GGUF's folder holds no weights: transformers reads the file
    if gguf is not None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    for ids in prompts:
        # An explicit mask: without one, generate treats prompt tokens equal to pad_token_id as padding.
        gen = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
        )
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    spec = dict(VARIANTS[request.param])
    folder = write_random_model(tmp_path_factory.mktemp(request.param), spec.pop("shape"), vocab_size=512, **spec)
    prompts = _prompts(512)
    return request.param, folder, prompts, _reference(folder, prompts)


def _run(engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    return [final[str(i)].outputs[0].token_ids for i in range(len(prompts))]


def test_greedy_parity_with_transformers(variant):
    name, folder, prompts, expected = variant
    engine = make_engine(folder, max_num_batched_tokens=96)
    got = _run(engine, prompts)
    assert got == expected, f"{name}: token mismatch"
    stats = engine.stats()
    # The three prompts sharing 70 tokens (4 full blocks) arrive together; those admitted after the
    # first one's prefix blocks are filled reuse them instead of recomputing.
    assert stats.prefix_hit_tokens >= 64, "a prompt sharing a 70-token prefix should reuse its 4 full blocks"
    assert stats.blocks_used == 0 and stats.num_running == 0


def test_greedy_parity_under_preemption(variant):
    name, folder, prompts, expected = variant
    # 24 blocks of 16 tokens cannot hold the batch: sequences are preempted and recomputed.
    engine = make_engine(folder, num_kv_blocks=24, max_num_batched_tokens=128)
    got = _run(engine, prompts)
    assert engine.stats().num_preemptions > 0
    assert got == expected, f"{name}: preemption changed the output"
    assert engine.kv.pool.num_free == 24


@pytest.mark.slow
def test_smollm2_parity(default_model_dir):
    """The default model (its GGUF dequantized), 8 prompts of different lengths together, 64 greedy tokens."""
    from edgepaged.models.loader import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    texts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "def fibonacci(n):",
        "Explain paged attention in one paragraph. Paged attention stores the KV cache",
        "1, 2, 3, 4, 5,",
        "Once upon a time, in a land far away, there lived a",
        "Explain paged attention in one paragraph. Paged attention is",
        "Q: What is the boiling point of water at sea level?\nA:",
    ]
    prompts = [tok(t).input_ids for t in texts]
    expected = _reference(default_model_dir, prompts)
    # transformers dequantizes the GGUF to float32; so does this engine (tests/test_quant.py
    # compares the quantized one).
    got = _run(make_engine(default_model_dir, max_num_batched_tokens=64, quantization="dequantize"), prompts)
    assert got == expected

"""The shipped example profile jetson-orin-nano-8gb-3b-q4: a 3B-class 4-bit model on an 8 GB Orin
Nano at 8-16K context, planned as `edgepaged profile show` plans for a device that is not here
(the profile's figures, the analytic activation estimate), with the weights counted from the
Llama-3.2-3B shape in the Q4_K_M mix: no checkpoint needed."""

from __future__ import annotations

import pytest

from edgepaged.memory.planner import ESTIMATED_CUDA_OVERHEAD_BYTES, MemoryPlanError, estimate_activation_bytes, plan_memory
from edgepaged.memory.probe import facts_from_profile
from edgepaged.models.config import ModelConfig
from edgepaged.profiles import GIB, load_profile
from edgepaged.quant.gguf import Q4_K_M, recipe_bytes

LLAMA_3_2_3B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=3072, intermediate_size=8192,
    num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)


def _plan(profile, weights_bytes: int, cfg: ModelConfig):
    return plan_memory(
        profile, facts_from_profile(profile), weights_bytes=weights_bytes,
        activation_bytes=estimate_activation_bytes(cfg, profile), overhead_bytes=ESTIMATED_CUDA_OVERHEAD_BYTES,
        kv_bytes_per_token=cfg.kv_bytes_per_token(2), max_model_len=cfg.max_context,
    )


def test_orin_nano_runs_a_3b_4bit_model_at_16k_context():
    profile = load_profile("jetson-orin-nano-8gb-3b-q4")
    cfg = ModelConfig.from_dict(LLAMA_3_2_3B)
    weights = recipe_bytes(cfg, Q4_K_M, 2)
    assert 2.3 * GIB < weights < 2.5 * GIB  # llama.cpp's Q4_K_M file of this model is 2.0 GB
    plan = _plan(profile, weights, cfg)
    assert plan.max_model_len == 16384
    assert plan.max_seqs_at_max_len >= 1  # a whole 16K sequence
    assert plan.kv_tokens >= 3 * 8192  # or three 8K ones
    # The figures the profile's comment quotes.
    assert round(plan.weights_bytes / GIB, 2) == 2.42
    assert round(plan.kv_pool_bytes / GIB, 2) == 2.79
    assert plan.kv_tokens == 26096


def test_the_same_model_in_float16_does_not_fit():
    profile = load_profile("jetson-orin-nano-8gb-3b-q4")
    cfg = ModelConfig.from_dict(LLAMA_3_2_3B)
    with pytest.raises(MemoryPlanError):
        _plan(profile, recipe_bytes(cfg, {"default": "F16"}, 2), cfg)

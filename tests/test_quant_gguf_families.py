"""Qwen3 and Phi-3 GGUF files, named and described as llama.cpp's converter writes them
(qwen3: attn_q_norm / attn_k_norm, key_length apart from hidden / heads; phi3: fused attn_qkv,
gate and up fused in ffn_up, rope.dimension_count for partial rotary, longrope factors as
tensors), against the same weights loaded as a Hugging Face folder.

Each file stands alone (no config.json beside it): loading it goes through models/loader.py's
conversion, so the model's shape comes from the GGUF metadata. A float32 file must give the
folder's greedy tokens and logits for 32 steps; a Q4_0 one kept quantized must match itself
dequantized (the fused packed projections).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import make_engine
from gguf_models import RECIPES, gguf_from_hf_folder

from edgepaged import SamplingParams
from edgepaged.kernels.reference import TOLERANCE, relative_error
from edgepaged.models.config import ModelConfig
from edgepaged.models.loader import resolve_model
from edgepaged.models.random_init import write_random_model

NEW_TOKENS = 32
VOCAB = 512
# family: the random_init shape, and overrides (a pretraining length under 2048 picks the long factors)
FAMILIES = {
    "qwen3": ("tiny-qwen3", {}),
    "phi3": ("tiny-phi3", {}),
    "phi4mini-long": ("tiny-phi4mini", {"original_max_position_embeddings": 48}),
}


def _greedy_with_logits(engine, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    rows, compute = [], engine.model.compute_logits
    # Every step's logits must pass through compute_logits: no greedy token from the lm_head.
    engine.model.decode_fusions = dataclasses.replace(engine.model.decode_fusions, greedy=False)

    def recording(hidden):
        logits = compute(hidden)
        rows.append(logits.float())
        return logits

    engine.model.compute_logits = recording
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    tokens = engine.run_to_completion(["r"])["r"].outputs[0].token_ids
    return tokens, torch.cat(rows)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    shape, overrides = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = write_random_model(root / "hf", shape, vocab_size=VOCAB, **overrides)
    return request.param, folder, root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPAGED_CACHE", str(tmp_path / "cache"))


def test_gguf_config_matches_the_folders(family):
    name, folder, root = family
    gguf = gguf_from_hf_folder(folder, root / "f32.gguf")
    assert not (gguf.parent / "config.json").exists()
    want, got = ModelConfig.from_folder(folder), ModelConfig.from_folder(resolve_model(gguf))
    # GGUF keeps eps and the attention factor in float32; the special ids live in the vocabulary.
    skip = {"rms_norm_eps", "rope_scaling", "eos_token_ids", "bos_token_id"}
    for field in ModelConfig.__dataclass_fields__:
        if field not in skip:
            assert getattr(got, field) == getattr(want, field), f"{name}: {field}"
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)
    if want.rope_scaling is None:
        assert got.rope_scaling is None
    else:
        for key, value in want.rope_scaling.items():
            same = got.rope_scaling[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6))
            assert same, f"{name}: rope_scaling {key}"
        assert got.rope_scaling["attention_factor"] > 1  # stored by the converter, read back
    assert (got.qk_norm, got.rotary_dim < got.head_dim) == (name == "qwen3", name.startswith("phi4mini"))


def test_float32_gguf_decodes_as_the_folder_does(family):
    name, folder, root = family
    gguf_folder = resolve_model(gguf_from_hf_folder(folder, root / "f32-greedy.gguf"))
    prompt = [random.Random(5).randrange(VOCAB) for _ in range(60)]  # past phi4mini-long's 48
    want_tokens, want = _greedy_with_logits(make_engine(folder), prompt)
    got_tokens, got = _greedy_with_logits(make_engine(gguf_folder), prompt)
    assert got_tokens == want_tokens, f"{name}: greedy tokens differ"
    assert relative_error(got, want) < TOLERANCE[torch.float32], name


def test_quantized_gguf_kept_packed_matches_its_dequantisation(family):
    name, folder, root = family
    gguf_folder = resolve_model(gguf_from_hf_folder(folder, root / "q4_0.gguf", RECIPES["q4_0"]))
    engine = make_engine(gguf_folder, quantization="keep")
    assert type(engine.model.layers[0].self_attn.qkv_proj.weight).__name__ == "CpuInt4"  # fused, still packed
    assert type(engine.model.layers[0].mlp.gate_up_proj.weight).__name__ == "CpuInt4"
    prompt = [random.Random(6).randrange(VOCAB) for _ in range(12)]
    got_tokens, got = _greedy_with_logits(engine, prompt)
    want_tokens, want = _greedy_with_logits(make_engine(gguf_folder, quantization="dequantize"), prompt)
    assert (got - want).norm() / want.norm() < 2e-2, name  # bfloat16 activations in the CPU int4 kernel
    assert got_tokens == want_tokens, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_quantized_gguf_on_cuda_matches_its_dequantisation(family, backend):
    """The packed fused attn_qkv / ffn_up through the Triton W4A16/W8A16 kernels, q/k norms and
    partial rotary on the GPU paths; float32 is the kernels' exact path: tokens identical."""
    name, folder, root = family
    gguf_folder = resolve_model(gguf_from_hf_folder(folder, root / "q4_0-cuda.gguf", RECIPES["q4_0"]))
    prompt = [random.Random(7).randrange(VOCAB) for _ in range(60)]
    runs = {}
    for mode in ("keep", "dequantize"):
        engine = make_engine(gguf_folder, device=torch.device("cuda"), backend=backend, quantization=mode,
                             num_kv_blocks=32, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128)
        runs[mode] = _greedy_with_logits(engine, prompt)
    (got_tokens, got), (want_tokens, want) = runs["keep"], runs["dequantize"]
    assert got_tokens == want_tokens, f"{name} on {backend}"
    assert relative_error(got.cpu(), want.cpu()) < 1e-2, f"{name} on {backend}"  # the kernels' dots may run in tf32

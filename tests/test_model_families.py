"""The 2026 edge families beside Llama: Qwen3 (q/k norms), Phi-3.5 and Phi-4-mini (checkpoints with
fused qkv/gate_up, longrope, partial rotary, tied embeddings), each against transformers on a tiny
random model written by transformers itself.

Per family: the logits of every one of 32 greedy steps within the kernels' float32 tolerance of
transformers' (its `generate`, KV cache and all), and the greedy tokens of prompts submitted
together identical for 32 tokens. The CUDA path of the model (fused norm and rope
kernels) is checked on the CPU under the Triton interpreter, in a child process as in
tests/test_fused_kernels.py, and on a GPU by the gpu-marked tests at the end.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_engine, run_under_interpreter
from transformers import AutoModelForCausalLM

from edgepaged import ModelLoadError, SamplingParams
from edgepaged.kernels.reference import TOLERANCE, relative_error
from edgepaged.models.config import ModelConfig
from edgepaged.models.random_init import write_random_model

NEW_TOKENS = 32
VOCAB = 512

# name: (shape, overrides, prompt lengths; the last one's logits are compared at every step)
FAMILIES = {
    "qwen3": ("tiny-qwen3", {}, (3, 17, 90, 40)),
    # An engine context (2048) within the pretraining length (4096): longrope's short factors.
    "phi3": ("tiny-phi3", {}, (3, 17, 90, 40)),
    "phi4mini": ("tiny-phi4mini", {}, (3, 17, 90, 40)),
    # A pretraining length of 48 under the engine's 2048: the long factors, which transformers also
    # uses throughout for prompts longer than 48 (see edgepaged/models/rope.py).
    "phi4mini-long": ("tiny-phi4mini", {"original_max_position_embeddings": 48}, (49, 130, 70)),
}


def _prompts(lengths) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def _reference(folder: Path, prompts: list[list[int]], device: str = "cpu") -> tuple[list[list[int]], torch.Tensor]:
    """transformers' greedy tokens per prompt (`generate`, with its KV cache), and the logits of
    each of the last prompt's steps."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None
    tokens = []
    with torch.no_grad():
        for ids in prompts:
            t = torch.tensor([ids], device=device)
            gen = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 pad_token_id=0, return_dict_in_generate=True, output_logits=True)
            tokens.append(gen.sequences[0, len(ids):].tolist())
    return tokens, torch.cat(gen.logits).float().cpu()


def _greedy(engine, prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    return [final[str(i)].outputs[0].token_ids for i in range(len(prompts))]


def _greedy_with_logits(engine, prompt: list[int], max_tokens: int = NEW_TOKENS) -> tuple[list[int], torch.Tensor]:
    """One request's greedy tokens and the logits row of each of its steps."""
    rows, compute = [], engine.model.compute_logits
    # Every step's logits must pass through compute_logits: no greedy token from the lm_head.
    engine.model.decode_fusions = dataclasses.replace(engine.model.decode_fusions, greedy=False)

    def recording(hidden):
        logits = compute(hidden)
        rows.append(logits.float().cpu())
        return logits

    engine.model.compute_logits = recording
    try:
        tokens = _greedy(engine, [prompt], max_tokens)[0]
    finally:
        engine.model.compute_logits = compute
    return tokens, torch.cat(rows)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    shape, overrides, lengths = FAMILIES[request.param]
    folder = write_random_model(tmp_path_factory.mktemp(request.param), shape, vocab_size=VOCAB, **overrides)
    prompts = _prompts(lengths)
    return request.param, folder, prompts, *_reference(folder, prompts)


def test_logits_match_transformers_at_every_step(family):
    name, folder, prompts, tokens, logits = family
    got_tokens, got = _greedy_with_logits(make_engine(folder), prompts[-1])
    assert got_tokens == tokens[-1], f"{name}: greedy tokens differ"
    err = relative_error(got, logits)
    assert err < TOLERANCE[torch.float32], f"{name}: logits differ from transformers' by {err:.2e}"


def test_greedy_tokens_match_transformers_in_one_batch(family):
    """All prompts together: continuous batching, a chunked prefill, decodes beside prefills."""
    name, folder, prompts, tokens, _ = family
    assert _greedy(make_engine(folder, max_num_batched_tokens=64), prompts) == tokens, f"{name}: token mismatch"


def test_family_features_are_read_from_the_config(family):
    name, folder, *_ = family
    cfg = ModelConfig.from_folder(folder)
    assert cfg.qk_norm == (name == "qwen3")
    assert cfg.rotary_dim == (cfg.head_dim * 3 // 4 if name.startswith("phi4mini") else cfg.head_dim)
    assert cfg.tie_word_embeddings == (name != "phi3")
    assert (cfg.rope_scaling or {}).get("rope_type") == (None if name == "qwen3" else "longrope")
    assert not cfg.qkv_bias and not cfg.o_bias


def _hub_layout(folder: Path, rope_type: str) -> dict:
    """The folder's config.json as the Phi-3.5/Phi-4-mini checkpoints on the Hub spell it (the
    transformers 4.x layout): rope_scaling with `type`, theta and partial_rotary_factor top-level."""
    raw = json.loads((folder / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params["rope_theta"]
    raw["partial_rotary_factor"] = params["partial_rotary_factor"]
    raw["rope_scaling"] = {"type": rope_type, "short_factor": params["short_factor"], "long_factor": params["long_factor"]}
    return raw


@pytest.mark.parametrize("rope_type", ["longrope", "su"])  # "su": the older checkpoints' name for longrope
def test_hub_layout_of_a_phi4mini_config_reads_the_same(tmp_path, rope_type):
    folder = write_random_model(tmp_path / "m", "tiny-phi4mini", vocab_size=64)
    hub = ModelConfig.from_dict(_hub_layout(folder, rope_type))
    assert hub == ModelConfig.from_folder(folder)


def test_longrope_factors_of_the_wrong_length_are_refused(tmp_path):
    folder = write_random_model(tmp_path / "m", "tiny-phi4mini", vocab_size=64)
    raw = _hub_layout(folder, "longrope")
    raw["rope_scaling"]["long_factor"] = raw["rope_scaling"]["long_factor"][:-1]
    with pytest.raises(ModelLoadError, match="long_factor with 12 values .* got 11 values"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("arch, model_type", [("Gemma3ForCausalLM", "gemma3_text"), ("Gemma3ForConditionalGeneration", "gemma3")])
def test_gemma3_is_refused_by_name(tmp_path, arch, model_type):
    """Gemma 3 needs sliding-window layers edgepaged does not run yet: refused before any weight loads."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
    with pytest.raises(ModelLoadError, match=f"{arch}.*not supported.*Phi3ForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# The CUDA path (fused norm and rope kernels, q/k norms through the norm kernel, partial rotary
# as a strided view) against the eager path, on the CPU under the Triton interpreter.


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


@pytest.mark.parametrize("name", ["qwen3", "phi4mini", "phi4mini-long"])
def test_fused_path_matches_eager_path_under_the_interpreter(interpreted, name):
    r = interpreted[name]
    assert r["tokens_equal"], r
    assert r["rel_err"] < 1e-5, r


def _fused_against_eager(name: str, folder: Path) -> dict:
    """8 greedy tokens of one prompt and their logits, eager then fused (the flag a CUDA model
    sets), same weights."""
    prompt = _prompts(FAMILIES[name][2])[1]
    runs = {}
    for fused in (False, True):
        engine = make_engine(folder)
        engine.model.fused = fused
        runs[fused] = _greedy_with_logits(engine, prompt, max_tokens=8)
    return {
        "tokens_equal": runs[True][0] == runs[False][0],
        "rel_err": relative_error(runs[True][1], runs[False][1]),
    }


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU (skipped without one), both backends: fp32 parity with transformers on the GPU,
# and bf16 logits as close to the fp32 reference as transformers' bf16 ones.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gpu_family(request, tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    shape, overrides, lengths = FAMILIES[request.param]
    folder = write_random_model(tmp_path_factory.mktemp(f"gpu-{request.param}"), shape, vocab_size=VOCAB, **overrides)
    prompts = _prompts(lengths)
    return request.param, folder, prompts, *_reference(folder, prompts, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_fp32_parity_with_transformers(gpu_family, backend):
    name, folder, prompts, tokens, logits = gpu_family
    engine = make_engine(folder, device=torch.device("cuda"), backend=backend, max_num_batched_tokens=64)
    assert engine.model.fused, "a CUDA model must take the fused path"
    got_tokens, got = _greedy_with_logits(engine, prompts[-1])
    err = relative_error(got, logits)
    assert err < TOLERANCE[torch.float32], f"{name}/{backend}: logits differ from transformers' by {err:.2e}"
    assert got_tokens == tokens[-1]
    assert _greedy(engine, prompts) == tokens, f"{name}/{backend}: token mismatch"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_bf16_logits_within_tolerance(gpu_family, backend):
    """Judged as tests/test_gpu_parity.py judges bf16: the engine's prefill logits in bf16 about as
    close to the fp32 reference as transformers' own bf16 logits are."""
    name, folder, prompts, _, logits = gpu_family
    ids, exact = prompts[-1], logits[0].double()
    with torch.no_grad():
        peer16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        peer = peer16(torch.tensor([ids], device="cuda")).logits[0, -1].double().cpu()
    engine = make_engine(folder, device=torch.device("cuda"), dtype=torch.bfloat16, backend=backend)
    got = _greedy_with_logits(engine, ids, max_tokens=1)[1][0].double()
    ours, theirs = ((got - exact).norm() / exact.norm()).item(), ((peer - exact).norm() / exact.norm()).item()
    assert torch.isfinite(got).all()
    assert ours <= max(1.5 * theirs, 1e-2), f"{name}/{backend} bf16 error vs fp32: edgepaged {ours:.3g}, transformers {theirs:.3g}"


if __name__ == "__main__":
    import tempfile

    from test_kernels import _patch_interpreter_for_numpy_2_4

    _patch_interpreter_for_numpy_2_4()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family_name in ("qwen3", "phi4mini", "phi4mini-long"):
            shape, overrides, _ = FAMILIES[family_name]
            model_dir = write_random_model(Path(tmp) / family_name, shape, vocab_size=VOCAB, **overrides)
            result[family_name] = _fused_against_eager(family_name, model_dir)
    print(json.dumps(result))

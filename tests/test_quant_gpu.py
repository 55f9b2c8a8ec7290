"""Quantized GGUF models end to end on a CUDA GPU (skipped without one): the packed weights run
the Triton W4A16/W8A16 kernels inside the engine, for both attention backends, against the same
file dequantized on the same GPU.

The models are small random llamas (tests/gguf_models.py) in Q4_0, Q4_1, Q8_0 and the Q4_K_M
mix (Q4_K with Q6_K v/down/embedding: a fused qkv of two formats), with SmolLM2's tokenizer and
its 49,152-row tied embedding, so the lm_head is the GEMV of a real small model. The engine
runs as the h200 profile would: bf16 activations, overlapped steps, and on the triton backend
decode from CUDA graphs (which fail if the quantized linear syncs with the host).

- bf16: prefill logits within test_quant.py's tolerance of the dequantized model's; greedy
  tokens the same for 32 tokens, or parting only where the reference's two best logits are
  within the logit noise measured on the prefill (bf16 rounding of the dequantized weights is
  that noise; a near-tie it decides is not a fault of the kernels);
- fp32 (the kernels' exact path): greedy tokens identical for 32 tokens, no allowance;
- the engine's weights_bytes is the packed size the GGUF's tensor table gives.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_engine
from gguf_models import RECIPES, write_gguf_model

from edgepaged import SamplingParams
from edgepaged.models.loader import gguf_source
from edgepaged.quant import GGUFFile
from edgepaged.quant.linear import ConcatWeight, CudaWeight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BACKENDS = ["triton", "torch"]
TOKENS = 32
PROMPT = "Paged attention keeps the key and value cache in fixed blocks, so a long context costs only the blocks it fills."


@pytest.fixture(scope="module", params=sorted(RECIPES))
def gguf_model(request, tmp_path_factory, tokenizer_dir):
    return write_gguf_model(
        tmp_path_factory.mktemp("gguf-gpu") / request.param, RECIPES[request.param], tokenizer_from=tokenizer_dir,
        vocab=49152,
    )


def _engine(folder, backend: str, quantization: str, dtype: torch.dtype):
    return make_engine(
        folder, device=torch.device("cuda"), dtype=dtype, backend=backend, quantization=quantization,
        num_kv_blocks=64, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256, overlap_steps=True,
    )


def _prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """The last prompt position's logits (an eager step), the request then aborted."""
    engine.add_request("prefill", ids, SamplingParams(max_tokens=1, temperature=0.0))
    sched = engine.scheduler.schedule()
    logits = engine.runner.execute(sched, engine.kv).logits[0].float()
    engine.abort_request("prefill")
    return logits


def _run(folder, backend: str, quantization: str, dtype: torch.dtype) -> dict:
    engine = _engine(folder, backend, quantization, dtype)
    try:
        ids = engine.encode(PROMPT)
        logits = _prefill_logits(engine, ids)
        graphs = engine.runner.graphs
        replays = graphs.replays if graphs is not None else 0
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, logprobs=2)
        engine.add_request("greedy", ids, params)
        out = engine.run_to_completion(["greedy"])["greedy"].outputs[0]
        weights = [m for m in engine.model.modules() if isinstance(m, (CudaWeight, ConcatWeight))]
        return {
            "logits": logits,
            "tokens": out.token_ids,
            "logprobs": out.logprobs,
            "weights_bytes": engine.weights_bytes,
            "graph_replays": (graphs.replays - replays) if graphs is not None else None,
            "packed_modules": len(weights),
            "meta_params": [n for n, p in engine.model.named_parameters() if p.is_meta],
        }
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def _first_parting(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_quantized_model_matches_its_dequantisation(gguf_model, backend):
    got = _run(gguf_model, backend, "keep", torch.bfloat16)
    want = _run(gguf_model, backend, "dequantize", torch.bfloat16)

    assert not got["meta_params"], f"left on meta after loading: {got['meta_params'][:5]}"
    assert got["packed_modules"] > 0
    if backend == "triton":
        assert got["graph_replays"] >= TOKENS - 2, "decode did not run from CUDA graphs"
    # The packed size, as the GGUF's tensor table gives it (norms in bf16), a fraction of the dense one.
    assert got["weights_bytes"] == GGUFFile(gguf_source(gguf_model)).tensor_bytes(2)
    assert got["weights_bytes"] < want["weights_bytes"] / 1.8

    g, w = got["logits"], want["logits"]
    assert torch.isfinite(g).all()
    error = ((g - w).norm() / w.norm()).item()
    # Both sides round to bf16 (the reference its dequantized weights, the kernels their
    # activations); the Q4_K_M mix, with Q6_K's 16-wide groups, measured 2.8e-2 on an H200.
    bound = 3.5e-2 if "q4_k_m" in str(gguf_model) else 2e-2
    assert error < bound, f"prefill logits differ by {error:.3g} of their norm"
    assert g.argmax() == w.argmax()

    part = _first_parting(got["tokens"], want["tokens"])
    assert len(got["tokens"]) == len(want["tokens"]) == TOKENS
    if part < TOKENS:
        noise = (g - w).pow(2).mean().sqrt().item()
        top = {token: logprob for token, _, logprob in want["logprobs"][part].top}
        chosen = got["tokens"][part]
        margin = top[want["tokens"][part]] - top.get(chosen, float("-inf"))
        assert margin <= 3 * noise, (
            f"greedy tokens part at {part} where the reference's margin is {margin:.3f}, over 3x the "
            f"logit noise {noise:.3f}: {got['tokens']} vs {want['tokens']}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_greedy_tokens_identical(gguf_model, backend):
    """fp32 activations: exact dots in the kernels, exact dequantized weights in the reference."""
    got = _run(gguf_model, backend, "keep", torch.float32)
    want = _run(gguf_model, backend, "dequantize", torch.float32)
    assert ((got["logits"] - want["logits"]).norm() / want["logits"].norm()).item() < 1e-3
    assert got["tokens"] == want["tokens"]

"""Parity with transformers on a CUDA GPU, for both backends (skipped without a GPU).

fp32: greedy tokens identical to `generate`. bf16: the engine's prefill logits are about as close
to an fp32 reference as transformers' own bf16 logits are (greedy paths may legitimately diverge).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_engine
from transformers import AutoModelForCausalLM

from edgepaged import SamplingParams
from edgepaged.models.random_init import write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BACKENDS = ["torch", "triton"]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return write_random_model(
        tmp_path_factory.mktemp("gpu-llama"), "tiny-llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
        num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4, tie_word_embeddings=False,
    )


def _prompts(n=8, vocab=1024):
    rng = random.Random(1)
    shared = [rng.randrange(vocab) for _ in range(100)]
    out = [[rng.randrange(vocab) for _ in range(k)] for k in (4, 33, 90, 257, 600)]
    return out + [shared + [rng.randrange(vocab) for _ in range(k)] for k in (3, 40, 77)][: n - len(out)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_greedy_parity_on_gpu(gpu_model, backend):
    prompts = _prompts()
    ref = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.float32).cuda().eval()
    ref.generation_config.eos_token_id = None
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = []
    for ids in prompts:
        t = torch.tensor([ids], device="cuda")
        g = ref.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=64, pad_token_id=0)
        expected.append(g[0, len(ids):].tolist())
    eng = make_engine(gpu_model, device=torch.device("cuda"), backend=backend, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    final = eng.run_to_completion([str(i) for i in range(len(prompts))])
    got = [final[str(i)].outputs[0].token_ids for i in range(len(prompts))]
    assert got == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_within_tolerance(gpu_model, backend):
    """Measured against an fp32 reference: the engine in bf16 must be about as close to it as
    transformers in bf16 is (a fixed threshold would judge rounding order, not correctness)."""
    ids = _prompts()[3]
    with torch.no_grad():
        ref32 = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.float32).cuda().eval()
        exact = ref32(torch.tensor([ids], device="cuda")).logits[0, -1].double()
        ref16 = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.bfloat16).cuda().eval()
        peer = ref16(torch.tensor([ids], device="cuda")).logits[0, -1].double()
    eng = make_engine(gpu_model, device=torch.device("cuda"), dtype=torch.bfloat16, backend=backend,
                      max_num_batched_tokens=128)
    eng.add_request("x", ids, SamplingParams(max_tokens=1, temperature=0.0))
    sched = eng.scheduler.schedule()
    while not any(c.completes_prompt for c in sched.chunks):  # chunked prefill: run to the last chunk
        eng.runner.execute(sched, eng.kv)  # the scheduler has counted the chunk as computed
        sched = eng.scheduler.schedule()
    got = eng.runner.execute(sched, eng.kv).logits[0].double()
    ours = ((got - exact).norm() / exact.norm()).item()
    theirs = ((peer - exact).norm() / exact.norm()).item()
    assert torch.isfinite(got).all()
    assert ours <= max(1.5 * theirs, 1e-2), f"bf16 error vs fp32: edgepaged {ours:.3g}, transformers {theirs:.3g}"

"""The fused elementwise kernels (add + RMSNorm, rope, SiLU * up) against their references, and
the CUDA model path that uses them against the CPU path.

On the CPU the kernels run under the Triton interpreter in one child process (see
tests/test_kernels.py for why the interpreter must not be switched on in this process); the
child runs every case once and answers with one JSON object. Outputs the wrappers allocate are
NaN-filled, inputs sit in wider NaN-padded buffers, so a missed store or a read past a row shows
up as NaN. On a GPU the same checks run compiled, bf16 included, and the engine's greedy tokens
on CUDA must equal the CPU engine's.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import make_engine, run_under_interpreter

from edgepaged.models.random_init import write_random_model
from edgepaged.sampling import SamplingParams

NORM_CASES = [
    {"dtype": "float32", "tokens": 5, "hidden": 96, "residual": True, "strided": True},
    {"dtype": "float16", "tokens": 4, "hidden": 160, "residual": True, "strided": False},
    {"dtype": "float32", "tokens": 3, "hidden": 64, "residual": False, "strided": True},
    {"dtype": "float16", "tokens": 2, "hidden": 48, "residual": False, "strided": False},
]
ROPE_CASES = [
    {"dtype": "float32", "tokens": 5, "num_q_heads": 6, "num_kv_heads": 2, "head_dim": 32},
    {"dtype": "float16", "tokens": 3, "num_q_heads": 4, "num_kv_heads": 1, "head_dim": 64},
]
SILU_CASES = [
    {"dtype": "float32", "tokens": 3, "intermediate": 1100, "strided": True},  # two column blocks, ragged
    {"dtype": "float16", "tokens": 4, "intermediate": 96, "strided": False},
]


def _id(case: dict) -> str:
    return "-".join(f"{k}{v}" if not isinstance(v, str) else v for k, v in case.items())


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every CPU case run once under the interpreter, keyed like `_run_all`'s result."""
    return run_under_interpreter(__file__)


@pytest.mark.parametrize("i", range(len(NORM_CASES)), ids=[_id(c) for c in NORM_CASES])
def test_fused_add_rms_norm_matches_reference(interpreted, i):
    _assert_norm(interpreted["norm"][i])


@pytest.mark.parametrize("i", range(len(ROPE_CASES)), ids=[_id(c) for c in ROPE_CASES])
def test_rotary_embedding_matches_reference_in_place(interpreted, i):
    _assert_rope(interpreted["rope"][i])


@pytest.mark.parametrize("i", range(len(SILU_CASES)), ids=[_id(c) for c in SILU_CASES])
def test_silu_and_mul_matches_reference(interpreted, i):
    _assert_silu(interpreted["silu"][i])


def test_fused_model_forward_matches_eager_forward(interpreted):
    """The CUDA path's wiring (residual carried beside x, rope in place on the QKV output,
    fused MLP) checked on the CPU: a mixed step through the same model, interpreted kernels."""
    r = interpreted["model"]
    assert r["finite"]
    assert r["rel_err"] < 1e-5, r


def _assert_norm(r: dict) -> None:
    assert r["finite"], "NaN in an output: a store was missed or padding was read"
    assert r["residual_equal"], "x + residual differs from the eager add"
    assert r["rel_err"] < r["tolerance"], r
    if not r["has_residual"]:
        assert r["residual_is_input"], "with no residual the input itself is the residual stream"


def _assert_rope(r: dict) -> None:
    assert r["finite"], "NaN in q or k: a head or half was left unrotated or read from padding"
    assert r["q_rel_err"] < r["tolerance"] and r["k_rel_err"] < r["tolerance"], r
    assert r["rest_untouched"], "v or the padding beside q/k was written"


def _assert_silu(r: dict) -> None:
    assert r["finite"], "NaN in the output: a column block was missed or padding was read"
    assert r["shape_ok"]
    assert r["rel_err"] < r["tolerance"], r


# ---------------------------------------------------------------------------------------------
# GPU: the same checks compiled, and the model path end to end.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_DTYPES = ["float32", "float16", "bfloat16"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("i", range(len(NORM_CASES)))
def test_gpu_fused_add_rms_norm(i, dtype):
    _assert_norm(_check_norm(**{**NORM_CASES[i], "dtype": dtype}, device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("i", range(len(ROPE_CASES)))
def test_gpu_rotary_embedding(i, dtype):
    _assert_rope(_check_rope(**{**ROPE_CASES[i], "dtype": dtype}, device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("i", range(len(SILU_CASES)))
def test_gpu_silu_and_mul(i, dtype):
    _assert_silu(_check_silu(**{**SILU_CASES[i], "dtype": dtype}, device="cuda"))


@pytest.fixture(scope="module")
def tiny_random_model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("fused-tiny"), "tiny-llama", vocab_size=512)


def _greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for n, ids in enumerate(prompts):
        engine.add_request(str(n), ids, params)
    final = engine.run_to_completion([str(n) for n in range(len(prompts))])
    return [final[str(n)].outputs[0].token_ids for n in range(len(prompts))]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_fused_model_path_matches_cpu(tiny_random_model, backend):
    """fp32 greedy decoding, prefill and decode (graph-captured with the triton backend): the
    fused CUDA path must pick the CPU path's tokens."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 33, 70)]
    expected = _greedy(make_engine(tiny_random_model), prompts)
    engine = make_engine(tiny_random_model, device=torch.device("cuda"), backend=backend)
    assert engine.model.fused, "a CUDA model must take the fused path"
    assert _greedy(engine, prompts) == expected


def test_cpu_model_keeps_the_eager_path(tiny_random_model):
    assert not make_engine(tiny_random_model).model.fused


# ---------------------------------------------------------------------------------------------
# The checks: run by the interpreter child on the CPU and in-process on a GPU.


@contextlib.contextmanager
def _nan_allocations():
    """Make the wrappers' torch.empty/empty_like hand out NaN, so unwritten elements show."""
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))
    torch.empty_like = lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan"))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def _in_wider(x: torch.Tensor, extra: int) -> torch.Tensor:
    """x as a view into a buffer `extra` columns wider, the extra columns NaN."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + extra), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    return wide[..., : x.shape[-1]]


def _check_norm(dtype, tokens, hidden, residual, strided, device="cpu"):
    from edgepaged.kernels import fused_add_rms_norm
    from edgepaged.kernels.fused_reference import fused_add_rms_norm_ref
    from edgepaged.kernels.reference import TOLERANCE, relative_error

    g = torch.Generator().manual_seed(11)
    dt = getattr(torch, dtype)
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(dt).to(device)
    res = torch.randn(tokens, hidden, generator=g).to(dt).to(device) if residual else None
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dt).to(device)
    if strided:
        x = _in_wider(x, 7)
        res = None if res is None else _in_wider(res, 3)
    with _nan_allocations():
        out, res_out = fused_add_rms_norm(x, res, weight, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, weight, 1e-5)
    return {
        "finite": bool(out.isfinite().all() and res_out.isfinite().all()),
        "residual_equal": torch.equal(res_out, ref_res),
        "residual_is_input": res_out is x,
        "has_residual": residual,
        "rel_err": relative_error(out, ref_out),
        "tolerance": TOLERANCE[dt],
    }


def _check_rope(dtype, tokens, num_q_heads, num_kv_heads, head_dim, device="cpu"):
    from edgepaged.kernels import rotary_embedding_
    from edgepaged.kernels.fused_reference import rotary_embedding_ref
    from edgepaged.kernels.reference import TOLERANCE, relative_error

    g = torch.Generator().manual_seed(12)
    dt = getattr(torch, dtype)
    max_positions = 50
    # Independent random halves: a kernel reading the wrong half of a table row fails.
    cos = (torch.rand(max_positions, head_dim, generator=g) * 2 - 1).to(dt).to(device)
    sin = (torch.rand(max_positions, head_dim, generator=g) * 2 - 1).to(dt).to(device)
    positions = torch.randint(0, max_positions, (tokens,), generator=g).to(device)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    # A fused QKV output with one NaN head of padding after V, as from a wider projection.
    qkv = torch.full((tokens, q_size + 2 * kv_size + head_dim), float("nan"), dtype=dt, device=device)
    qkv[:, : q_size + 2 * kv_size] = torch.randn(tokens, q_size + 2 * kv_size, generator=g).to(dt).to(device)
    before = qkv.clone()
    q = qkv[:, :q_size].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    ref_q, ref_k = rotary_embedding_ref(q.clone(), k.clone(), positions, cos, sin)
    rotary_embedding_(q, k, positions, cos, sin)
    rest, rest_before = qkv[:, q_size + kv_size :], before[:, q_size + kv_size :]
    return {
        "finite": bool(q.isfinite().all() and k.isfinite().all()),
        "q_rel_err": relative_error(q, ref_q),
        "k_rel_err": relative_error(k, ref_k),
        "rest_untouched": torch.equal(rest.isnan(), rest_before.isnan())
        and torch.equal(rest.nan_to_num(), rest_before.nan_to_num()),
        "tolerance": TOLERANCE[dt],
    }


def _check_silu(dtype, tokens, intermediate, strided, device="cpu"):
    from edgepaged.kernels import silu_and_mul
    from edgepaged.kernels.fused_reference import silu_and_mul_ref
    from edgepaged.kernels.reference import TOLERANCE, relative_error

    g = torch.Generator().manual_seed(13)
    dt = getattr(torch, dtype)
    gate_up = (torch.randn(tokens, 2 * intermediate, generator=g) * 3).to(dt).to(device)
    if strided:
        gate_up = _in_wider(gate_up, 5)
    with _nan_allocations():
        out = silu_and_mul(gate_up)
    return {
        "finite": bool(out.isfinite().all()),
        "shape_ok": out.shape == (tokens, intermediate),
        "rel_err": relative_error(out, silu_and_mul_ref(gate_up)),
        "tolerance": TOLERANCE[dt],
    }


def _check_model_forward() -> dict:
    """One step of two decodes and a 9-token prefill chunk, eager vs fused, same weights."""
    import tempfile
    from pathlib import Path

    from edgepaged.kernels.reference import relative_error

    from edgepaged.attention import AttentionBatch

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(write_random_model(Path(tmp), "tiny-llama", vocab_size=512))
    model, cfg, block_size = engine.model, engine.model.config, 16
    g = torch.Generator().manual_seed(14)
    context_lens = [20, 5, 12]  # the last one is a prefill chunk of 9 after a 3-token prefix
    positions = torch.tensor([19, 4, *range(3, 12)])
    tables = torch.tensor([[0, 1], [2, 0], [3, 0]], dtype=torch.int32)
    slots = torch.tensor([16 + 3, 2 * 16 + 4, *(3 * 16 + p for p in range(3, 12))])
    batch = AttentionBatch(
        slot_mapping=slots,
        num_decode_tokens=2,
        decode_block_tables=tables[:2],
        decode_context_lens=torch.tensor(context_lens[:2], dtype=torch.int32),
        max_decode_context_len=20,
        prefill_block_tables=tables[2:],
        prefill_query_start_loc=torch.tensor([0, 9], dtype=torch.int32),
        prefill_context_lens=torch.tensor(context_lens[2:], dtype=torch.int32),
        max_prefill_query_len=9,
        max_prefill_context_len=12,
        block_size=block_size,
    )
    shape = (4, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(cfg.num_layers)]
    input_ids = torch.randint(0, 512, (11,), generator=g)
    hidden = {}
    with torch.inference_mode():
        for fused in (False, True):
            model.fused = fused
            step_caches = [(k.clone(), v.clone()) for k, v in caches]
            hidden[fused] = model(input_ids, positions, step_caches, engine.backend.prepare(batch))
    return {"finite": bool(hidden[True].isfinite().all()), "rel_err": relative_error(hidden[True], hidden[False])}


def _run_all() -> dict:
    return {
        "norm": [_check_norm(**c) for c in NORM_CASES],
        "rope": [_check_rope(**c) for c in ROPE_CASES],
        "silu": [_check_silu(**c) for c in SILU_CASES],
        "model": _check_model_forward(),
    }


if __name__ == "__main__":
    from test_kernels import _patch_interpreter_for_numpy_2_4

    _patch_interpreter_for_numpy_2_4()
    result = _run_all()
    print(json.dumps(result))

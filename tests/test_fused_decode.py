"""The batch-1 decode fusions (kernels/decode_gemv.py, the in-kernel split merge, the greedy
lm_head) against the unfused arithmetic they replace.

Each fused launch is checked against the chain of eager ops or kernels it stands for: the
references of kernels/fused_reference.py composed with F.linear. On the CPU the kernels run
under the Triton interpreter in one child process (this file run as a script; see
tests/test_kernels.py for why the interpreter needs its own process) on small shapes; outputs
the wrappers allocate are NaN-filled so a missed store shows. On a GPU the same checks run
compiled at the SmolLM2-135M and Llama-3.2-1B shapes in bf16, and the engine's greedy tokens
with every fusion on must equal those with every fusion off.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_engine, run_under_interpreter
from test_fused_kernels import _nan_allocations

from edgepaged.config import DecodeFusions
from edgepaged.models.random_init import write_random_model
from edgepaged.sampling import SamplingParams

# The plain and prologue cases: ragged K and N (masking); block_k forces a K loop of several
# steps (the default tiles take K <= 2,048 in one, as these small K are).
GEMV_CASES = [
    {"dtype": "float32", "k": 200, "n": 37, "bias": True, "block_k": None},
    {"dtype": "float16", "k": 96, "n": 64, "bias": False, "block_k": None},
    {"dtype": "float32", "k": 200, "n": 37, "bias": True, "block_k": 64},
]
CPU_SHAPE = {"hidden": 96, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate": 72, "vocab": 300}
SMOLLM2_135M = {"hidden": 576, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64, "intermediate": 1536,
                "vocab": 49152}
LLAMA_1B = {"hidden": 2048, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 64, "intermediate": 8192,
            "vocab": 128256}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


@pytest.mark.parametrize("i", range(len(GEMV_CASES)))
def test_gemv_plain_and_norm_prologues(interpreted, i):
    _assert_gemv(interpreted["gemv"][i])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gate_up_silu_epilogue(interpreted, dtype):
    _assert_close(interpreted["silu"][dtype])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_qkv_rope_kv_write_epilogue(interpreted, dtype):
    _assert_rope_kv(interpreted["rope_kv"][dtype])


def test_greedy_argmax_epilogue(interpreted):
    _assert_argmax(interpreted["argmax"])


def test_split_attention_merges_in_one_launch(interpreted):
    _assert_merge(interpreted["merge"])


def test_one_token_model_step_fused_matches_unfused(interpreted):
    _assert_model(interpreted["model"])


def test_engine_greedy_tokens_fused_equal_unfused(interpreted):
    """The runner's folded greedy path and the fused layers through the whole engine (the
    model switched to its CUDA path, kernels interpreted): the same tokens as no fusion."""
    r = interpreted["engine"]
    assert r["folded"] > 0, "no step took the folded greedy path"
    assert r["tokens"]["all"] == r["tokens"]["none"], r


def test_fusions_parse_and_refuse_unknown_names():
    assert DecodeFusions.parse("all") == DecodeFusions(True, True, True, True, True)
    assert DecodeFusions.parse("") == DecodeFusions.parse("default") == DecodeFusions()
    assert DecodeFusions.parse("none") == DecodeFusions(False, False, False, False, False)
    assert DecodeFusions.parse("qkv, greedy") == DecodeFusions(True, False, False, False, True)
    with pytest.raises(ValueError, match="unknown fusion"):
        DecodeFusions.parse("qkv,rope")


def _assert_gemv(r: dict) -> None:
    for name in ("plain", "norm", "gather"):
        assert r[name]["finite"], f"{name}: NaN in the output (a row or chunk was not stored)"
        assert r[name]["rel_err"] < r["tolerance"], (name, r)
    assert r["norm"]["residual_equal"], "the new residual stream is not x + residual"
    assert r["gather"]["residual_equal"], "the gathered row is not the embedding row"


def _assert_close(r: dict) -> None:
    assert r["finite"], "NaN in the output"
    assert r["rel_err"] < r["tolerance"], r


def _assert_rope_kv(r: dict) -> None:
    assert r["finite"], "NaN in q or in the written slot"
    assert r["q_rel_err"] < r["tolerance"] and r["k_rel_err"] < r["tolerance"], r
    assert r["v_rel_err"] < r["tolerance"], r
    assert r["rest_untouched"], "a slot other than this token's was written"
    assert r["padded_writes_nothing"], "slot -1 (a padded row) wrote into the pool"


def _assert_argmax(r: dict) -> None:
    assert r["tokens"] == r["expected"], r
    assert r["counter_reset"], "the counter must be zero again after the launch"


def _assert_merge(r: dict) -> None:
    assert r["splits"] > 1, "the case must split the context"
    # Up to the fp32 summation order of the reduction: at most an ulp of the output dtype.
    assert r["rel_err"] <= r["tolerance"], ("the in-kernel merge must give the merge kernel's result", r)
    assert r["empty_rows_zero"], "an empty context must give zeros, as the merge kernel's"
    assert r["counters_reset"]


def _assert_model(r: dict) -> None:
    assert r["finite"]
    assert r["rel_err"] < r["tolerance"], r
    assert r["cache_rel_err"] < r["tolerance"], r
    assert r["greedy_token"] == r["logits_argmax"], r


# ---------------------------------------------------------------------------------------------
# GPU: the same checks compiled at the full shapes, and the engine end to end.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FULL_SHAPES = {"135m": SMOLLM2_135M, "1b": LLAMA_1B}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", FULL_SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_fused_kernels_at_full_shapes(shape, dtype):
    s = FULL_SHAPES[shape]
    for k, block_k in ((s["hidden"], None), (s["intermediate"], None), (s["intermediate"], 256)):
        _assert_gemv(_check_gemv(dtype, k, s["hidden"], True, block_k, device="cuda"))
    _assert_close(_check_silu(dtype, s["hidden"], s["intermediate"], device="cuda"))
    _assert_rope_kv(_check_rope_kv(dtype, **{k: s[k] for k in ("hidden", "num_q_heads", "num_kv_heads", "head_dim")},
                                   device="cuda"))
    _assert_argmax(_check_argmax(dtype, s["hidden"], s["vocab"], device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_split_attention_merges_in_one_launch(dtype):
    _assert_merge(_check_merge(dtype, num_q_heads=32, num_kv_heads=8, head_dim=64, context=3000, device="cuda"))


@pytest.fixture(scope="module")
def random_135m_shape(tmp_path_factory, tokenizer_dir):
    """Two layers of the SmolLM2-135M shape with the real tokenizer: what the fusions see at
    full width, built in seconds."""
    return write_random_model(
        tmp_path_factory.mktemp("fused-135m"), "tiny-llama", vocab_size=49152, tokenizer_from=tokenizer_dir,
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=4,
    )


def _greedy_run(folder, dtype, fusions: str, monkeypatch) -> dict:
    """40 greedy tokens of a text prompt (the real tokenizer), one request (batch-1 decode, CUDA
    graphs) under EDGEPAGED_FUSIONS=fusions; with the fold off, each step's top-2 logit margin
    in units of the top logit's ulp (the room a rounding difference has before it flips)."""
    monkeypatch.setenv("EDGEPAGED_FUSIONS", fusions)
    engine = make_engine(folder, device=torch.device("cuda"), dtype=dtype, backend="triton", max_num_seqs=4,
                         max_model_len=1024)
    assert engine.runner.graphs is not None
    model, folded, margins = engine.model, 0, []
    greedy_tokens, compute_logits = model.greedy_tokens, model.compute_logits

    def counting(hidden):
        nonlocal folded
        folded += 1
        return greedy_tokens(hidden)

    def recording(hidden):
        logits = compute_logits(hidden)
        top = logits.float().topk(2, dim=-1).values[0]
        ulp = torch.finfo(logits.dtype).eps * float(top[0].abs().clamp_min(1e-3))
        margins.append(float(top[0] - top[1]) / ulp)
        return logits

    model.greedy_tokens, model.compute_logits = counting, recording
    engine.add_request("r", "The capital of France is", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    tokens = engine.run_to_completion(["r"])["r"].outputs[0].token_ids
    return {"tokens": tokens, "folded": folded, "margins": margins, "replays": engine.runner.graphs.replays}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_engine_greedy_tokens_equal_with_and_without_fusions(random_135m_shape, monkeypatch, dtype):
    """Every fusion on picks exactly the tokens of every fusion off, with graphs replayed and
    greedy sampling folded into the lm_head. In float32 all 40 tokens must agree. In bf16 a
    different (but equally valid) fp32 accumulation order moves a logit by an ulp or two, which
    flips a near tie, so there the tokens must agree up to the first step whose unfused top-2
    margin is under 4 ulps, and most steps must be clear of that."""
    off = _greedy_run(random_135m_shape, dtype, "none", monkeypatch)
    on = _greedy_run(random_135m_shape, dtype, "all", monkeypatch)
    assert on["replays"] > 30 and off["replays"] > 30
    assert on["folded"] > 30 and off["folded"] == 0
    assert len(off["tokens"]) == len(on["tokens"]) == 40
    if dtype == torch.float32:
        assert on["tokens"] == off["tokens"]
        return
    clear = next((i for i, m in enumerate(off["margins"]) if m < 4), len(off["margins"]))
    assert sum(m >= 4 for m in off["margins"]) >= 20, off["margins"]
    assert on["tokens"][:clear] == off["tokens"][:clear], (clear, off["margins"])


# ---------------------------------------------------------------------------------------------
# The checks: run by the interpreter child on the CPU and in-process on a GPU.


def _rand(g, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _norm_ref(x, residual, weight, eps=1e-5):
    from edgepaged.kernels.fused_reference import fused_add_rms_norm_ref

    return fused_add_rms_norm_ref(x, residual, weight, eps)


def _check_gemv(dtype, k, n, bias, block_k=None, device="cpu"):
    from edgepaged.kernels import GemvPrologue, decode_gemv
    from edgepaged.kernels.decode_gemv import GemvTiles
    from edgepaged.kernels.reference import TOLERANCE, relative_error

    g = torch.Generator().manual_seed(21)
    dt = getattr(torch, dtype)
    x, res = _rand(g, 1, k, dtype=dt, device=device), _rand(g, 1, k, dtype=dt, device=device)
    w = _rand(g, n, k, dtype=dt, device=device, scale=k**-0.5)
    b = _rand(g, n, dtype=dt, device=device) if bias else None
    norm_w = (torch.rand(k, generator=g) + 0.5).to(dt).to(device)
    table = _rand(g, 11, k, dtype=dt, device=device)
    ids = torch.tensor([7], device=device)
    tiles = GemvTiles(4, block_k, 4) if block_k else None
    with _nan_allocations():
        plain, _ = decode_gemv(x, w, b, tiles=tiles)
        normed, new_res = decode_gemv(x, w, b, prologue=GemvPrologue(norm_w, res, None, 1e-5), tiles=tiles)
        gathered, row = decode_gemv(table, w, b, prologue=GemvPrologue(norm_w, None, ids, 1e-5), tiles=tiles)
    ref_h, ref_res = _norm_ref(x, res, norm_w)
    ref_g, _ = _norm_ref(table[7:8], None, norm_w)
    return {
        "plain": {"finite": bool(plain.isfinite().all()), "rel_err": relative_error(plain, F.linear(x, w, b))},
        "norm": {"finite": bool(normed.isfinite().all()), "rel_err": relative_error(normed, F.linear(ref_h, w, b)),
                 "residual_equal": torch.equal(new_res, ref_res)},
        "gather": {"finite": bool(gathered.isfinite().all()),
                   "rel_err": relative_error(gathered, F.linear(ref_g, w, b)),
                   "residual_equal": torch.equal(row, table[7:8])},
        "tolerance": TOLERANCE[dt],
    }


def _check_silu(dtype, hidden, intermediate, device="cpu"):
    from edgepaged.kernels import SILU_MUL, GemvPrologue, decode_gemv
    from edgepaged.kernels.fused_reference import silu_and_mul_ref
    from edgepaged.kernels.reference import TOLERANCE, relative_error

    g = torch.Generator().manual_seed(22)
    dt = getattr(torch, dtype)
    x, res = _rand(g, 1, hidden, dtype=dt, device=device), _rand(g, 1, hidden, dtype=dt, device=device)
    w = _rand(g, 2 * intermediate, hidden, dtype=dt, device=device, scale=hidden**-0.5 * 3)
    norm_w = (torch.rand(hidden, generator=g) + 0.5).to(dt).to(device)
    with _nan_allocations():
        out, _ = decode_gemv(x, w, prologue=GemvPrologue(norm_w, res, None, 1e-5), epilogue=SILU_MUL)
    ref = silu_and_mul_ref(F.linear(_norm_ref(x, res, norm_w)[0], w))
    return {"finite": bool(out.isfinite().all()), "rel_err": relative_error(out, ref), "tolerance": TOLERANCE[dt]}


def _check_rope_kv(dtype, hidden, num_q_heads, num_kv_heads, head_dim, device="cpu"):
    from edgepaged.kernels import ROPE_KV, GemvPrologue, RopeKV, decode_gemv
    from edgepaged.kernels.fused_reference import rotary_embedding_ref
    from edgepaged.kernels.reference import TOLERANCE, relative_error
    from edgepaged.models.rope import rope_tables

    g = torch.Generator().manual_seed(23)
    dt = getattr(torch, dtype)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    x, res = _rand(g, 1, hidden, dtype=dt, device=device), _rand(g, 1, hidden, dtype=dt, device=device)
    w = _rand(g, q_size + 2 * kv_size, hidden, dtype=dt, device=device, scale=hidden**-0.5)
    b = _rand(g, q_size + 2 * kv_size, dtype=dt, device=device)
    norm_w = (torch.rand(hidden, generator=g) + 0.5).to(dt).to(device)
    cos, sin = (t.to(dt) for t in rope_tables(head_dim, 10000.0, None, 64, device))
    block_size, slot = 8, 3 * 8 + 5
    k_cache = torch.full((5, block_size, num_kv_heads, head_dim), float("nan"), dtype=dt, device=device)
    v_cache = k_cache.clone()
    positions = torch.tensor([37], device=device)
    rope = RopeKV(num_q_heads, num_kv_heads, head_dim, positions, cos, sin,
                  torch.tensor([slot], device=device), k_cache, v_cache)
    with _nan_allocations():
        q, _ = decode_gemv(x, w, b, prologue=GemvPrologue(norm_w, res, None, 1e-5), epilogue=ROPE_KV, rope_kv=rope)
    qkv = F.linear(_norm_ref(x, res, norm_w)[0], w, b)
    ref_q, ref_k = rotary_embedding_ref(
        qkv[:, :q_size].view(1, num_q_heads, head_dim), qkv[:, q_size : q_size + kv_size].view(1, num_kv_heads, head_dim),
        positions, cos, sin,
    )
    ref_v = qkv[:, q_size + kv_size :].view(num_kv_heads, head_dim)
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    others = torch.ones(flat_k.shape[0], dtype=torch.bool)
    others[slot] = False
    before_k = k_cache.clone()
    padded = RopeKV(num_q_heads, num_kv_heads, head_dim, positions, cos, sin,
                    torch.tensor([-1], device=device), k_cache, v_cache)
    decode_gemv(x, w, b, prologue=GemvPrologue(norm_w, res, None, 1e-5), epilogue=ROPE_KV, rope_kv=padded)
    return {
        "finite": bool(q.isfinite().all() and flat_k[slot].isfinite().all() and flat_v[slot].isfinite().all()),
        "q_rel_err": relative_error(q.view(1, num_q_heads, head_dim), ref_q),
        "k_rel_err": relative_error(flat_k[slot], ref_k[0]),
        "v_rel_err": relative_error(flat_v[slot], ref_v),
        "rest_untouched": bool(flat_k[others.to(device)].isnan().all() and flat_v[others.to(device)].isnan().all()),
        "padded_writes_nothing": torch.equal(k_cache.nan_to_num(), before_k.nan_to_num()),
        "tolerance": TOLERANCE[dt],
    }


def _check_argmax(dtype, hidden, vocab, device="cpu"):
    from edgepaged.kernels import ARGMAX, argmax_scratch_for, decode_gemv

    g = torch.Generator().manual_seed(24)
    dt = getattr(torch, dtype)
    w = _rand(g, vocab, hidden, dtype=dt, device=device, scale=hidden**-0.5)
    scratch = argmax_scratch_for(vocab, hidden, device)
    tokens, expected = [], []
    for trial in range(3):
        x = _rand(g, 1, hidden, dtype=dt, device=device)
        if trial == 2:  # a tie between two rows far apart: the lower index wins, as in torch.argmax
            top = int(F.linear(x, w).argmax())
            w[vocab - 1] = w[top]
            w[min(top, vocab - 2) // 2] = w[top]
        tokens.append(int(decode_gemv(x, w, epilogue=ARGMAX, argmax_scratch=scratch)[0]))
        # The logits as the kernel rounds them (an fp32 sum, then the model dtype), not cuBLAS's
        # 16-bit GEMV: its own summation order may round a near tie the other way.
        expected.append(int(F.linear(x.float(), w.float()).to(dt).argmax()))
    return {"tokens": tokens, "expected": expected, "counter_reset": int(scratch[2]) == 0}


def _check_merge(dtype, num_q_heads, num_kv_heads, head_dim, context, device="cpu"):
    from edgepaged.kernels import paged_decode_attention, plan_decode
    from edgepaged.kernels.reference import relative_error

    g = torch.Generator().manual_seed(25)
    dt = getattr(torch, dtype)
    block_size, batch = 16, 3
    blocks = batch * -(-context // block_size) + 1
    k_cache = _rand(g, blocks, block_size, num_kv_heads, head_dim, dtype=dt, device=device)
    v_cache = _rand(g, blocks, block_size, num_kv_heads, head_dim, dtype=dt, device=device)
    q = _rand(g, batch, num_q_heads, head_dim, dtype=dt, device=device)
    width = -(-context // block_size)
    tables = torch.randperm(blocks - 1, generator=g)[: batch * width].view(batch, width).int().to(device)
    lens = torch.tensor([context, context // 3, 0], dtype=torch.int32, device=device)
    splits = 4
    two = plan_decode(batch, num_q_heads, num_kv_heads, head_dim, context, device, num_splits=splits)
    one = plan_decode(batch, num_q_heads, num_kv_heads, head_dim, context, device, num_splits=splits,
                      merge_in_kernel=True)
    ref = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, plan=two)
    outs = []
    for _ in range(2):  # twice: the counters must be left at zero for the next launch
        out = torch.full_like(q, float("nan"))
        outs.append(paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, plan=one, out=out))
    return {
        "splits": one.num_splits,
        "rel_err": max(relative_error(o, ref) for o in outs),
        "tolerance": 2 * torch.finfo(dt).eps,
        "empty_rows_zero": bool((outs[-1][2] == 0).all()),
        "counters_reset": bool((one.counters == 0).all()),
    }


def _check_model_step(dtype="float32") -> dict:
    """One decode step of one token through a random model on the triton backend (interpreted on
    the CPU, the model switched to its CUDA path), every fusion on against every fusion off."""
    import tempfile
    from pathlib import Path

    from edgepaged.attention import AttentionBatch
    from edgepaged.kernels.reference import TOLERANCE, relative_error

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(write_random_model(Path(tmp), "tiny-llama", vocab_size=512), backend="triton")
    model, cfg, block_size = engine.model, engine.model.config, 16
    model.fused = True
    g = torch.Generator().manual_seed(26)
    context = 40
    batch = AttentionBatch(
        slot_mapping=torch.tensor([16 * 2 + 7]),
        num_decode_tokens=1,
        decode_block_tables=torch.tensor([[1, 3, 2]], dtype=torch.int32),
        decode_context_lens=torch.tensor([context], dtype=torch.int32),
        max_decode_context_len=context,
        prefill_block_tables=torch.zeros(0, 3, dtype=torch.int32),
        prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
        prefill_context_lens=torch.zeros(0, dtype=torch.int32),
        max_prefill_query_len=0,
        max_prefill_context_len=0,
        block_size=block_size,
    )
    shape = (4, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(cfg.num_layers)]
    input_ids, positions = torch.tensor([123]), torch.tensor([context - 1])
    hidden, written = {}, {}
    with torch.inference_mode():
        for name in ("none", "all"):
            model.decode_fusions = DecodeFusions.parse(name)
            engine.backend.merge_in_kernel = model.decode_fusions.attn
            step_caches = [(k.clone(), v.clone()) for k, v in caches]
            hidden[name] = model(input_ids, positions, step_caches, engine.backend.prepare(batch))
            written[name] = torch.stack([torch.stack(kv) for kv in step_caches])
        logits = model.compute_logits(hidden["none"])
        token = model.greedy_tokens(hidden["all"])
    return {
        "finite": bool(hidden["all"].isfinite().all()),
        "rel_err": relative_error(hidden["all"], hidden["none"]),
        "cache_rel_err": relative_error(written["all"], written["none"]),
        "greedy_token": int(token),
        "logits_argmax": int(logits.argmax()),
        "tolerance": TOLERANCE[getattr(torch, dtype)],
    }


def _check_engine_tokens() -> dict:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_model(Path(tmp), "tiny-llama", vocab_size=512)
        tokens, folded = {}, 0
        for name in ("none", "all"):
            engine = make_engine(folder, backend="triton")
            engine.model.fused = True
            engine.runner.set_decode_fusions(DecodeFusions.parse(name))
            greedy_tokens = engine.model.greedy_tokens

            def counting(hidden, greedy_tokens=greedy_tokens):
                nonlocal folded
                folded += 1
                return greedy_tokens(hidden)

            engine.model.greedy_tokens = counting
            engine.add_request("r", [5, 77, 300, 2, 41], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
            tokens[name] = engine.run_to_completion(["r"])["r"].outputs[0].token_ids
    return {"tokens": tokens, "folded": folded}


def record_decode_gemv_launches(dtype: torch.dtype) -> None:
    """Every decode_gemv variant a model step of the 135M and 1B shapes launches, on CPU tensors,
    for tests/test_kernels.py's compile check (it swaps the kernel for a recorder first)."""
    from edgepaged.kernels import ARGMAX, ROPE_KV, SILU_MUL, GemvPrologue, RopeKV, argmax_scratch_for, decode_gemv

    for s in (SMOLLM2_135M, LLAMA_1B):
        hidden, inter, d = s["hidden"], s["intermediate"], s["head_dim"]
        hq, hkv = s["num_q_heads"], s["num_kv_heads"]

        def zeros(*shape):  # never read: the recorder only keeps the launch
            return torch.empty(*shape, dtype=dtype)

        x, norm_w, ids = zeros(1, hidden), zeros(hidden), torch.zeros(1, dtype=torch.int64)
        caches = zeros(4, 16, hkv, d), zeros(4, 16, hkv, d)
        one = torch.zeros(1, dtype=torch.int64)
        rope = RopeKV(hq, hkv, d, one, zeros(64, d), zeros(64, d), one, *caches)
        qkv_w = zeros((hq + 2 * hkv) * d, hidden)
        decode_gemv(zeros(8, hidden), qkv_w, prologue=GemvPrologue(norm_w, None, ids, 1e-5), epilogue=ROPE_KV,
                    rope_kv=rope)
        decode_gemv(x, qkv_w, prologue=GemvPrologue(norm_w, x, None, 1e-5), epilogue=ROPE_KV, rope_kv=rope)
        decode_gemv(zeros(1, hq * d), zeros(hidden, hq * d))
        decode_gemv(x, zeros(2 * inter, hidden), prologue=GemvPrologue(norm_w, x, None, 1e-5), epilogue=SILU_MUL)
        decode_gemv(zeros(1, inter), zeros(hidden, inter))
        decode_gemv(x, zeros(s["vocab"], hidden), epilogue=ARGMAX,
                    argmax_scratch=argmax_scratch_for(s["vocab"], hidden, "cpu"))


def _run_all() -> dict:
    small = {k: CPU_SHAPE[k] for k in ("hidden", "num_q_heads", "num_kv_heads", "head_dim")}
    return {
        "gemv": [_check_gemv(**c) for c in GEMV_CASES],
        "silu": {dt: _check_silu(dt, CPU_SHAPE["hidden"], CPU_SHAPE["intermediate"]) for dt in ("float32", "float16")},
        "rope_kv": {dt: _check_rope_kv(dt, **small) for dt in ("float32", "float16")},
        "argmax": _check_argmax("float32", CPU_SHAPE["hidden"], CPU_SHAPE["vocab"]),
        "merge": _check_merge("float32", num_q_heads=4, num_kv_heads=2, head_dim=16, context=300),
        "model": _check_model_step(),
        "engine": _check_engine_tokens(),
    }


if __name__ == "__main__":
    from test_kernels import _patch_interpreter_for_numpy_2_4

    _patch_interpreter_for_numpy_2_4()
    print(json.dumps(_run_all()))

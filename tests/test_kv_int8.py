"""The 8-bit KV cache (kv_cache.dtype int8 / fp8_e4m3) on the CPU.

- the format: `quantize_kv` round trip error within half a code step;
- the kernels under Triton's interpreter (in a child process, see tests/test_kernels.py for why):
  the int8 write path bit for bit against the torch reference, the int8 and fp8 read paths of
  decode and prefill against the dequantizing reference, and the triton backend's mixed step
  against the torch backend's. The fp8 *write* runs on the GPU only: the 3.6 interpreter drops the
  carry when rounding to fp8 overflows the mantissa (127.9 -> 64 instead of 128), so its codes are
  wrong exactly at powers of two (tests/test_kv_int8_gpu.py checks the compiled kernel);
- the engine with the torch backend: int8 greedy tokens against the model-dtype pool wherever the
  reference's top-2 gap leaves room for quantization error, prefix hits, copy-on-write with the
  scales copied;
- the planner: an int8 pool holds >= 1.9x the tokens of a 16-bit one in the same budget, and
  `profile show` says so; profile and config validation of the new values.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_engine, record_schedules

from edgepaged import SamplingParams
from edgepaged.attention import KV_QUANT_DTYPES, dequantize_kv, quantize_kv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels import _Child, _strided_copy  # noqa: E402  the child-process harness

# ---------------------------------------------------------------------------------------------
# The format


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_quantize_round_trip_is_within_half_a_step(name):
    dtype = KV_QUANT_DTYPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 64, generator=g) * torch.logspace(-3, 2, 64)[:, None, None]
    x[5] = 0.0  # an all-zero row: scale at its floor, codes 0, no 0/0
    codes, scale = quantize_kv(x, dtype)
    assert codes.dtype == dtype and scale.dtype == torch.float16 and scale.shape == x.shape[:2]
    back = dequantize_kv(codes, scale, torch.float32)
    assert back[5].abs().max() == 0 and back.isfinite().all()
    absmax = x.abs().amax(-1, keepdim=True)
    # int8: half a step of absmax/127 (plus fp16 rounding of the scale); e4m3: 2^-4 relative
    # per element (3 mantissa bits), floored at its smallest normal step.
    if name == "int8":
        bound = absmax / 127 * 0.5 * (1 + 2**-10) + 1e-7
    else:
        bound = torch.maximum(x.abs() * 2**-4, absmax / 448 * 2**-6) * (1 + 2**-10) + 1e-7
    assert ((back - x).abs() <= bound).all()


# ---------------------------------------------------------------------------------------------
# Kernels under the interpreter


@pytest.fixture(scope="module")
def interpreted():
    child = _Child(interpret=True, script=__file__)
    yield child
    child.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_kv_quantizes_like_the_reference(interpreted, dtype):
    result = interpreted.run("write", dtype=dtype, kv_dtype="int8")
    assert result["codes_equal"] and result["scales_equal"], result
    assert result["written"] > 0 and result["skipped"] > 0


DECODE = [
    dict(dtype="float32", kv_dtype="int8", block_size=8, head_dim=32, num_kv_heads=2, group=3,
         context_lens=[37, 8, 100, 1], num_splits=None),
    dict(dtype="float16", kv_dtype="int8", block_size=16, head_dim=64, num_kv_heads=1, group=4,
         context_lens=[200, 16, 130], num_splits=4, shared_prefix_blocks=2),
    dict(dtype="float32", kv_dtype="int8", block_size=16, head_dim=32, num_kv_heads=2, group=1,
         context_lens=[64, 0, 150], num_splits=3),
    dict(dtype="float32", kv_dtype="fp8_e4m3", block_size=8, head_dim=32, num_kv_heads=2, group=3,
         context_lens=[90, 7, 33], num_splits=2),
]
PREFILL = [
    dict(dtype="float32", kv_dtype="int8", block_size=8, head_dim=32, num_kv_heads=2, group=3,
         context_lens=[37, 20, 100], query_lens=[5, 20, 70]),
    dict(dtype="float16", kv_dtype="int8", block_size=16, head_dim=64, num_kv_heads=1, group=4,
         context_lens=[150, 33, 64], query_lens=[1, 33, 17], shared_prefix_blocks=2),
    dict(dtype="float32", kv_dtype="fp8_e4m3", block_size=8, head_dim=32, num_kv_heads=2, group=2,
         context_lens=[40, 5, 70], query_lens=[40, 0, 30]),
]


def _kid(c: dict) -> str:
    return f"{c['kv_dtype']}-{c['dtype']}-bs{c['block_size']}-d{c['head_dim']}-g{c['group']}"


@pytest.mark.parametrize("case", DECODE, ids=_kid)
def test_decode_reads_8bit_cache(interpreted, case):
    result = interpreted.run("decode", **case)
    if case["num_splits"]:
        assert result["num_splits"] > 1
    assert result["finite"], "NaN/inf: a row was not written or a poisoned scale leaked"
    assert result["rel_err"] < result["tolerance"], result


@pytest.mark.parametrize("case", PREFILL, ids=_kid)
def test_prefill_reads_8bit_cache(interpreted, case):
    result = interpreted.run("prefill", **case)
    assert result["finite"], "NaN/inf: a row was not written or a poisoned scale leaked"
    assert result["rel_err"] < result["tolerance"], result


def test_triton_backend_int8_step_matches_torch_backend(interpreted):
    """Decodes and prefill chunks in one step over an int8 pool, the step's K/V quantized by
    each backend's own write: both read the same codes and scales, so they agree to fp32 rounding."""
    result = interpreted.run("backend_step", dtype="float32", kv_dtype="int8", block_size=8, head_dim=32,
                             num_kv_heads=2, group=3)
    assert result["finite"]
    assert result["codes_equal"] and result["scales_equal"], result
    assert result["rel_err_vs_torch_backend"] < 1e-4, result
    assert result["rel_err_vs_reference"] < 1e-4, result


@pytest.fixture(scope="module")
def compiler():
    child = _Child(interpret=False, script=__file__)
    yield child
    child.close()


@pytest.mark.parametrize("arch,kv_dtype", [(87, "int8"), (90, "int8"), (90, "float8_e4m3fn")])
def test_8bit_kernels_compile_without_spills(compiler, arch, kv_dtype):
    """The 8-bit variants built as tests/test_kernels.py builds the 16-bit ones (head dim 128,
    the largest tiles), for the 16-bit queries every GPU profile runs: no spills, shared memory
    within consumer Ampere's 99 KB. fp8 only for sm_90: below sm_89 the engine refuses it."""
    result = compiler.run("compile", arch=arch, kv_dtype=kv_dtype, dtypes=["float16", "bfloat16"])
    assert len(result["kernels"]) >= 10, result
    for name, usage in result["kernels"].items():
        assert usage["stack_bytes"] == 0, f"{name} spills: {usage}"
        assert usage["shared"] <= 99 * 1024, f"{name} needs too much shared memory: {usage}"


# ---------------------------------------------------------------------------------------------
# The engine (torch backend)

# A token is only required to match where the reference's top-2 log-probability gap exceeds
# this. Quantization moves a log-probability by d, so a gap by at most 2d: measured on the tiny
# random model (head dim 16, the coarsest averaging), d <= 0.012 over 4 prompts x 24 tokens, and
# the test asserts d < GAP_MARGIN / 2 itself, so the margin is never closer than the error. These
# random models have small gaps (many below 0.1), which is why exact parity cannot be asked of
# every token; in that run all 96 tokens agreed anyway.
GAP_MARGIN = 0.05
# Relative L2 error of prefill logits, int8 pool vs the model-dtype pool. Per-token absmax int8
# errs by at most 1/254 of a row's absmax per element (~0.2% RMS of K and V); measured 3.8-7.4e-3
# on the tiny model's logits. 2e-2 leaves 3x for other seeds, and is 50x below what a wrong or
# missing scale gives (a zeroed key or value block moves the logits by order 1).
LOGITS_RTOL = 2e-2


def _prompts(vocab: int, n: int = 4, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(k)] for k in (5, 23, 61, 140)][:n]


def _greedy(engine, prompts, max_tokens=24, n=1):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, n=n)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    final = engine.run_to_completion([str(i) for i in range(len(prompts))])
    return [final[str(i)] for i in range(len(prompts))]


def _agreed_prefix(ref, got, margin: float = GAP_MARGIN) -> tuple[int, int]:
    """(tokens that must agree: up to the first position the reference's gap is under the
    margin, tokens that do agree)."""
    must = 0
    for lp in ref.logprobs:
        if lp.top[0][2] - lp.top[1][2] < margin:
            break
        must += 1
    same = 0
    for a, b in zip(ref.token_ids, got.token_ids):
        if a != b:
            break
        same += 1
    return must, same


def _prefill_logits(engine, ids) -> torch.Tensor:
    engine.add_request("logits", ids, SamplingParams(max_tokens=1, temperature=0.0))
    sched = engine.scheduler.schedule()
    while not any(c.completes_prompt for c in sched.chunks):
        engine.runner.execute(sched, engine.kv)
        sched = engine.scheduler.schedule()
    logits = engine.runner.execute(sched, engine.kv).logits[0].double()
    engine.abort_request("logits")
    return logits


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    return make_engine(tiny_model_dir), make_engine(tiny_model_dir, kv_cache_dtype="int8")


def test_int8_pool_is_allocated_with_scales(engines):
    ref, eng = engines
    runner = eng.runner
    assert runner.kv_cache.dtype == torch.int8 and runner.kv_scales.dtype == torch.float16
    assert runner.kv_scales.shape == runner.kv_cache.shape[:-1]
    k, v = runner.kv_caches[0]
    assert k.data.data_ptr() == runner.kv_cache[0, 0].data_ptr() and v.scale.data_ptr() == runner.kv_scales[0, 1].data_ptr()
    # 1 byte per element plus 2 per (slot, head): under 0.3 of the fp32 pool of the same blocks
    assert runner.kv_cache_bytes < 0.3 * ref.runner.kv_cache_bytes


def test_int8_greedy_tokens_and_logits_match_the_model_dtype_pool(engines, tiny_model_dir):
    ref_engine, int8_engine = engines
    prompts = _prompts(ref_engine.model_config.vocab_size)
    ref, got = _greedy(ref_engine, prompts), _greedy(int8_engine, prompts)
    required = 0
    for r, g in zip(ref, got, strict=True):
        must, same = _agreed_prefix(r.outputs[0], g.outputs[0])
        assert same >= must, f"diverged at token {same}, where the reference's top-2 gap is above {GAP_MARGIN}"
        required += must
        pairs = zip(r.outputs[0].logprobs[:same], g.outputs[0].logprobs)
        moved = max((abs(a.logprob - b.logprob) for a, b in pairs), default=0.0)
        assert moved < GAP_MARGIN / 2, f"int8 moved a log-probability by {moved:.3f}: the margin no longer covers it"
    assert required >= 24, "the margin leaves too few tokens to compare"
    for ids in prompts:
        a, b = _prefill_logits(ref_engine, ids), _prefill_logits(int8_engine, ids)
        err = ((b - a).norm() / a.norm()).item()
        assert err < LOGITS_RTOL, f"int8 logits off by {err:.2e} relative (prompt of {len(ids)})"


def test_int8_prefix_hit_gives_the_tokens_of_a_fresh_run(tiny_model_dir):
    rng = random.Random(7)
    shared = [rng.randrange(1000) for _ in range(50)]  # three full blocks of 16
    first, second = shared + [1, 2, 3], shared + [4, 5, 6, 7]
    cached = make_engine(tiny_model_dir, kv_cache_dtype="int8")
    _greedy(cached, [first])
    before = cached.stats()
    (hit,) = _greedy(cached, [second])
    assert cached.stats().prefix_hit_rate > before.prefix_hit_rate
    (fresh,) = _greedy(make_engine(tiny_model_dir, kv_cache_dtype="int8", enable_prefix_caching=False), [second])
    assert hit.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_int8_copy_on_write_copies_the_scales(tiny_model_dir):
    """n=2 forks a prompt whose last block is partly filled; the fork's first write copies that
    block, and the copy must carry the scales (zero scales would silently zero its keys)."""
    engine = make_engine(tiny_model_dir, kv_cache_dtype="int8")
    runner, checked = engine.runner, []
    original = runner.copy_blocks

    def checking(copies):
        original(copies)
        for src, dst in copies:
            assert torch.equal(runner.kv_cache[:, :, dst], runner.kv_cache[:, :, src])
            assert torch.equal(runner.kv_scales[:, :, dst], runner.kv_scales[:, :, src])
            assert runner.kv_scales[:, :, dst].abs().sum() > 0, "the copied block holds no scales"
            checked.append((src, dst))

    runner.copy_blocks = checking
    schedules = record_schedules(engine)
    prompt = _prompts(engine.model_config.vocab_size)[1]  # 23 tokens: one full block and 7
    (out,) = _greedy(engine, [prompt], max_tokens=12, n=2)
    assert any(s.block_copies for s in schedules) and checked
    a, b = out.outputs
    assert a.token_ids == b.token_ids  # greedy: the fork and its parent read the same cache
    (single,) = _greedy(make_engine(tiny_model_dir, kv_cache_dtype="int8"), [prompt], max_tokens=12)
    assert a.token_ids == single.outputs[0].token_ids


# ---------------------------------------------------------------------------------------------
# Planner, profile show, validation


def _profile_file(tmp_path: Path, base: str, kv_dtype: str, **extra) -> Path:
    path = tmp_path / f"{base}-{kv_dtype}.yaml"
    path.write_text(yaml.safe_dump({"extends": base, "kv_cache": {"dtype": kv_dtype}, **extra}))
    return path


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_8bit_pool_holds_at_least_1_9x_the_tokens_of_16bit(tmp_path, kv_dtype):
    """bench_memory's claim on the planner: SmolLM2-135M's shape (head dim 64, the worst case for
    the scales' share) on an Orin Nano 8 GB's budget."""
    from edgepaged.memory.planner import kv_token_bytes, plan_memory
    from edgepaged.memory.probe import facts_from_profile
    from edgepaged.models.random_init import SHAPES
    from edgepaged.profiles import GIB, load_profile

    spec = SHAPES["smollm2-135m"]
    shape = _Shape(spec["num_hidden_layers"], spec["num_key_value_heads"], spec["hidden_size"] // spec["num_attention_heads"])
    plans = {}
    for name in ("auto", kv_dtype):
        profile = load_profile(_profile_file(tmp_path, "jetson-orin-nano-8gb", name))
        plans[name] = plan_memory(
            profile, facts_from_profile(profile), weights_bytes=270 << 20, activation_bytes=GIB // 2,
            overhead_bytes=512 << 20, kv_bytes_per_token=kv_token_bytes(shape, name, "float16"),
            kv_bytes_per_token_16bit=kv_token_bytes(shape, "float16", "float16"),
        )
    assert plans[kv_dtype].kv_bytes_per_token == 2 * 30 * 3 * (64 + 2)
    ratio = plans[kv_dtype].kv_tokens / plans["auto"].kv_tokens
    assert ratio >= 1.9, ratio
    assert plans[kv_dtype].kv_ratio_vs_16bit == pytest.approx(ratio, rel=1e-3)
    assert plans[kv_dtype].kv_tokens_16bit == plans["auto"].kv_tokens
    assert plans[kv_dtype].max_seqs_at_max_len >= 1.9 * plans["auto"].max_seqs_at_max_len - 1
    line = f"{kv_dtype}: {plans[kv_dtype].kv_tokens:,} tokens (x{ratio:.2f} of 16-bit"
    assert line in plans[kv_dtype].format_table()
    assert "(x1.00 of 16-bit" in plans["auto"].format_table()


class _Shape:
    def __init__(self, num_layers, num_kv_heads, head_dim):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim


def test_profile_show_reports_the_int8_gain(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from edgepaged.cli.profile import app

    path = _profile_file(tmp_path, "rtx-4060-8gb", "int8")
    runner = CliRunner()
    text = runner.invoke(app, ["show", str(path), "--model", str(tiny_model_dir)])
    assert text.exit_code == 0, text.output
    assert "KV cache" in text.output and "int8:" in text.output and "of 16-bit" in text.output
    shown = runner.invoke(app, ["show", str(path), "--model", str(tiny_model_dir), "--json"])
    plan = json.loads(shown.output)
    assert plan["kv_dtype"] == "int8" and plan["kv_ratio_vs_16bit"] >= 1.5
    assert plan["kv_tokens_16bit"] < plan["kv_tokens"]
    # the tiny model's head dim is 16: 2 layers x 2 heads x 2 (K, V) x (16 codes + a 2-byte scale)
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * (16 + 2)


def test_profiles_accept_8bit_kv_and_name_the_field_when_refused(tmp_path):
    from edgepaged.profiles import ProfileError, load_profile

    assert load_profile(_profile_file(tmp_path, "jetson-orin-nano-8gb", "int8")).kv_dtype == "int8"
    fp8 = load_profile(_profile_file(tmp_path, "jetson-orin-nano-8gb", "fp8_e4m3"))
    with pytest.raises(ProfileError, match=r"kv_cache\.dtype: fp8_e4m3 needs .* 8\.9 .*Orin is compute capability 8\.7"):
        fp8.check_kv_dtype_on((8, 7), "Orin")
    fp8.check_kv_dtype_on((9, 0), "NVIDIA H200")
    with pytest.raises(ProfileError, match=r"kv_cache\.dtype: expected 'auto' with the tensorrt backend"):
        load_profile(_profile_file(tmp_path, "jetson-orin-nano-8gb", "int8", backend="tensorrt"))
    with pytest.raises(ProfileError, match=r"kv_cache\.dtype: .*'int8' or 'fp8_e4m3'"):
        load_profile(_profile_file(tmp_path, "jetson-orin-nano-8gb", "int4"))


def test_config_carries_the_kv_dtype():
    from edgepaged.config import config_from_profile
    from edgepaged.profiles import load_profile
    from conftest import engine_config

    cpu = load_profile("cpu").model_copy(update={"kv_cache": load_profile("cpu").kv_cache.model_copy(update={"dtype": "int8"})})
    assert config_from_profile(cpu).kv_cache_dtype == "int8"
    assert config_from_profile(load_profile("cpu")).kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        engine_config(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="torch or triton backend"):
        engine_config(kv_cache_dtype="int8", backend="tensorrt")


# ---------------------------------------------------------------------------------------------
# The child side (interpreter)


def _check_write(dtype, kv_dtype):
    from edgepaged.kernels import write_kv
    from edgepaged.kernels.reference import write_kv_ref

    g = torch.Generator().manual_seed(1)
    dt, kvd = getattr(torch, dtype), KV_QUANT_DTYPES[kv_dtype]
    num_blocks, block_size, heads, dim, tokens = 6, 8, 3, 32, 19
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::4] = -1
    key = (torch.randn(tokens, heads, dim, generator=g) * 3).to(dt)
    value = torch.randn(tokens, heads, dim, generator=g).to(dt)
    key[1] = 0.0
    key = _strided_copy(key, 2)
    shape = (num_blocks, block_size, heads, dim)
    caches = [torch.full(shape, 7, dtype=torch.uint8).view(kvd) for _ in range(4)]
    scales = [torch.full(shape[:3], float("nan"), dtype=torch.float16) for _ in range(4)]
    write_kv(key, value, caches[0], caches[1], slots, scales[0], scales[1])
    write_kv_ref(key, value, caches[2], caches[3], slots, scales[2], scales[3])
    return {
        "codes_equal": all(torch.equal(caches[i].view(torch.uint8), caches[i + 2].view(torch.uint8)) for i in (0, 1)),
        "scales_equal": all(torch.equal(scales[i].isnan(), scales[i + 2].isnan())
                            and torch.equal(scales[i].nan_to_num(), scales[i + 2].nan_to_num()) for i in (0, 1)),
        "written": int((slots >= 0).sum()),
        "skipped": int((slots < 0).sum()),
    }


def _tolerance(dtype: torch.dtype) -> float:
    from edgepaged.kernels.reference import TOLERANCE

    return TOLERANCE[dtype]


def _check_decode(dtype, kv_dtype, block_size, head_dim, num_kv_heads, group, context_lens, num_splits,
                  shared_prefix_blocks=0):
    from edgepaged.kernels import paged_decode_attention, plan_decode
    from edgepaged.kernels.reference import paged_decode_attention_ref, random_paged_kv, relative_error

    g = torch.Generator().manual_seed(2)
    dt = getattr(torch, dtype)
    kv = random_paged_kv(context_lens, block_size, num_kv_heads, head_dim, dt, "cpu", g, shared_prefix_blocks,
                         kv_dtype=KV_QUANT_DTYPES[kv_dtype])
    num_q_heads = num_kv_heads * group
    q = torch.randn(len(context_lens), num_q_heads, head_dim, generator=g).to(dt)
    plan = plan_decode(len(context_lens), num_q_heads, num_kv_heads, head_dim, max(context_lens), "cpu",
                       num_splits=num_splits)
    for scratch in (plan.partial_out, plan.partial_max, plan.partial_sum):
        if scratch is not None:
            scratch.fill_(float("nan"))
    out = torch.full(q.shape, float("nan"), dtype=dt)
    scale = head_dim**-0.5
    paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, out=out, plan=plan,
                           k_scale=kv.k_scale, v_scale=kv.v_scale)
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale,
                                     kv.k_scale, kv.v_scale)
    return {"finite": bool(out.isfinite().all()), "rel_err": relative_error(out, ref), "tolerance": _tolerance(dt),
            "num_splits": plan.num_splits}


def _check_prefill(dtype, kv_dtype, block_size, head_dim, num_kv_heads, group, context_lens, query_lens,
                   shared_prefix_blocks=0):
    from edgepaged.kernels import paged_prefill_attention
    from edgepaged.kernels.reference import paged_prefill_attention_ref, random_paged_kv, relative_error

    g = torch.Generator().manual_seed(3)
    dt = getattr(torch, dtype)
    kv = random_paged_kv(context_lens, block_size, num_kv_heads, head_dim, dt, "cpu", g, shared_prefix_blocks,
                         kv_dtype=KV_QUANT_DTYPES[kv_dtype])
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, generator=g).to(dt)
    out = torch.full(q.shape, float("nan"), dtype=dt)
    scale = head_dim**-0.5
    paged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.context_lens, scale, out=out,
                            k_scale=kv.k_scale, v_scale=kv.v_scale)
    ref = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.context_lens, scale,
                                      kv.k_scale, kv.v_scale)
    return {"finite": bool(out.isfinite().all()), "rel_err": relative_error(out, ref), "tolerance": _tolerance(dt)}


def _max(lens: torch.Tensor) -> int:
    """The longest of `lens`, 0 for none (a decode-only or prefill-only step)."""
    return int(lens.max()) if lens.numel() else 0


def _finite_codes(cache: torch.Tensor) -> torch.Tensor:
    """A copy of an 8-bit cache with e4m3fn's NaN codes (0x7F, 0xFF) zeroed; int8 codes are always finite."""
    cache = cache.clone()
    if cache.dtype == torch.float8_e4m3fn:
        raw = cache.view(torch.uint8)
        raw[(raw & 0x7F) == 0x7F] = 0
    return cache


def step_batch(step, block_size):
    """The AttentionBatch of a `random_paged_step` (also used by the GPU tests)."""
    from edgepaged.attention import AttentionBatch

    nd, kv = step.num_decode_tokens, step.kv
    prefill_ctx = kv.context_lens[nd:]
    return AttentionBatch(
        slot_mapping=step.slot_mapping,
        num_decode_tokens=nd,
        decode_block_tables=kv.block_tables[:nd],
        decode_context_lens=kv.context_lens[:nd],
        max_decode_context_len=_max(kv.context_lens[:nd]),
        prefill_block_tables=kv.block_tables[nd:],
        prefill_query_start_loc=step.query_start_loc,
        prefill_context_lens=prefill_ctx,
        max_prefill_query_len=step.max_query_len,
        max_prefill_context_len=_max(prefill_ctx),
        block_size=block_size,
    )


def run_backend_step(step, batch, backends, kv_dtype):
    """Each backend's output on its own copy of the step's 8-bit pool, the pools it wrote, and
    the reference over a pool written by `write_kv_ref`."""
    from edgepaged.attention import QuantizedCache
    from edgepaged.kernels.reference import paged_decode_attention_ref, paged_prefill_attention_ref, write_kv_ref

    kv, nd, scale = step.kv, step.num_decode_tokens, backends[0].scale
    outs, pools = {}, {}
    for backend in backends:
        # The torch backend gathers padded slots and masks them afterwards (0 * NaN is NaN), so
        # it needs the finite pool the runner guarantees: zeroed scales, and for fp8 the poisoned
        # rows' NaN codes zeroed too. The Triton one must cope with the poison as it is.
        clean = backend.name == "torch"
        k_scale, v_scale = (s.nan_to_num(0.0) if clean else s.clone() for s in (kv.k_scale, kv.v_scale))
        k_codes, v_codes = (_finite_codes(c) if clean else c.clone() for c in (kv.k_cache, kv.v_cache))
        k, v = QuantizedCache(k_codes, k_scale), QuantizedCache(v_codes, v_scale)
        outs[backend.name] = backend.forward(step.q, step.k, step.v, k, v, backend.prepare(batch))
        pools[backend.name] = (k, v)
    k_cache, v_cache, k_scale, v_scale = (t.clone() for t in (kv.k_cache, kv.v_cache, kv.k_scale, kv.v_scale))
    write_kv_ref(step.k, step.v, k_cache, v_cache, step.slot_mapping, k_scale, v_scale)
    ref = torch.cat([
        paged_decode_attention_ref(step.q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens,
                                   scale, k_scale, v_scale),
        paged_prefill_attention_ref(step.q[nd:], k_cache, v_cache, batch.prefill_block_tables, step.query_start_loc,
                                    batch.prefill_context_lens, scale, k_scale, v_scale),
    ])
    return outs, pools, ref


def _check_backend_step(dtype, kv_dtype, block_size, head_dim, num_kv_heads, group):
    from edgepaged.backends.torch_ref import TorchRefBackend
    from edgepaged.backends.triton import TritonBackend
    from edgepaged.kernels.reference import random_paged_step, relative_error

    g = torch.Generator().manual_seed(4)
    kvd = KV_QUANT_DTYPES[kv_dtype]
    num_q_heads = num_kv_heads * group
    step = random_paged_step([70, 9, 33], [40, 80], [40, 15], block_size, num_q_heads, num_kv_heads, head_dim,
                             getattr(torch, dtype), "cpu", g, kv_dtype=kvd)
    batch = step_batch(step, block_size)
    args = (num_q_heads, num_kv_heads, head_dim, head_dim**-0.5, kvd)
    outs, pools, ref = run_backend_step(step, batch, [TritonBackend(*args), TorchRefBackend(*args)], kv_dtype)
    slots = step.slot_mapping
    written = [[(c.data.view(-1, num_kv_heads, head_dim)[slots].view(torch.uint8), c.scale.view(-1, num_kv_heads)[slots])
                for c in pools[name]] for name in ("triton", "torch")]
    out = outs["triton"]
    return {
        "finite": bool(out.isfinite().all()),
        "codes_equal": all(torch.equal(a[0], b[0]) for a, b in zip(*written)),
        "scales_equal": all(torch.equal(a[1], b[1]) for a, b in zip(*written)),
        "rel_err_vs_torch_backend": relative_error(out, outs["torch"]),
        "rel_err_vs_reference": relative_error(out, ref),
    }


if __name__ == "__main__":
    from test_kernels import _check_compile, _serve

    _serve({"write": _check_write, "decode": _check_decode, "prefill": _check_prefill,
            "backend_step": _check_backend_step, "compile": _check_compile})

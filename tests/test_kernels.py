"""The Triton kernels on the CPU: interpreted against the PyTorch references, and compiled for
an edge GPU to prove they build without spilling.

Triton picks the interpreter when a kernel is decorated, i.e. when `edgepaged.kernels` is first
imported, and the choice holds for the whole process. Setting TRITON_INTERPRET here would turn
every later import of the kernels in this pytest process (GPU tests, backend tests) into the
interpreter, so the checks run in child processes instead: this file, run as a script, is the
child. It answers one JSON request per line; each test sends one case and asserts on the reply.

Inputs are built by `edgepaged.kernels.reference`: random block placement, a block shared by two
sequences, table padding pointing at a NaN block, NaN in every slot no sequence owns; outputs
(and split-K scratch) are filled with NaN before each launch, so a missed write or a read past a
context shows up as NaN, which never passes. bf16 attention runs only on the GPU: the 3.6
interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import traceback

import pytest

_REPLY_TIMEOUT_S = 300


class _Child:
    """A long-lived child process running this file's checks, one JSON line per request."""

    def __init__(self, interpret: bool, script: str = __file__):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, check: str, **params) -> dict:
        self.proc.stdin.write(json.dumps({"check": check, "params": params}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], _REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"kernel check process gave no answer (exit code {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"{check} failed in the child:\n{reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def interpreted():
    child = _Child(interpret=True)
    yield child
    child.close()


@pytest.fixture(scope="module")
def compiler():
    child = _Child(interpret=False)
    yield child
    child.close()


def _case(dtype: str, block_size: int, head_dim: int, num_kv_heads: int, **rest) -> dict:
    return {"dtype": dtype, "block_size": block_size, "head_dim": head_dim, "num_kv_heads": num_kv_heads, **rest}


def _case_id(case: dict) -> str:
    return f"{case['dtype']}-bs{case['block_size']}-d{case['head_dim']}"


# dtype, block size, head dim, KV heads, then the case's own parameters
WRITE_CASES = [
    _case("float32", 8, 32, 3, slot_dtype="int64", strided=True),
    _case("float16", 16, 64, 2, slot_dtype="int32", strided=False),
    _case("bfloat16", 16, 64, 1, slot_dtype="int64", strided=True),
]
# Context lengths mix multiples of the block size with ragged ones; num_splits forces split-K.
DECODE_CASES = [
    _case("float32", 8, 32, 2, group=3, context_lens=[37, 8, 100, 1], num_splits=None),
    _case("float16", 16, 64, 1, group=4, context_lens=[200, 16, 130], num_splits=4, shared_prefix_blocks=2),
    _case("float32", 16, 64, 2, group=1, context_lens=[64, 0, 150], num_splits=3),
    _case("float16", 8, 32, 3, group=3, context_lens=[90, 250, 7], num_splits=None, strided=True),
    # A captured graph's plan: sized for a context far longer than the batch's, padded row included.
    _case("float16", 16, 64, 2, group=4, context_lens=[37, 300, 1000, 0], num_splits=8, plan_context=4096),
]
# A chunk after a cached prefix, a whole prompt, a one-token chunk, an empty chunk.
PREFILL_CASES = [
    _case("float32", 8, 32, 2, group=3, context_lens=[37, 20, 100], query_lens=[5, 20, 70], pass_max_query_len=True),
    _case("float16", 16, 64, 1, group=4, context_lens=[150, 33, 64], query_lens=[1, 33, 17], shared_prefix_blocks=2),
    _case("float16", 16, 64, 2, group=1, context_lens=[40, 5, 129], query_lens=[40, 0, 64], strided=True),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: f"{_case_id(c)}-{c['slot_dtype']}")
def test_write_kv_fills_exactly_its_slots(interpreted, case):
    result = interpreted.run("write_kv", **case)
    assert result["equal_to_reference"], "cache differs from write_kv_ref (written, skipped or untouched slots)"
    assert result["skipped"] > 0 and result["written"] > 0


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{_case_id(c)}-g{c['group']}-s{c['num_splits']}")
def test_paged_decode_matches_reference(interpreted, case):
    result = interpreted.run("decode", **case)
    if case["num_splits"]:
        assert result["num_splits"] > 1, "the case was meant to exercise split-K"
    assert result["finite"], "output has NaN/inf: a row was not written or a poisoned slot leaked"
    assert result["rel_err"] < result["tolerance"], result


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{_case_id(c)}-g{c['group']}")
def test_paged_prefill_matches_reference(interpreted, case):
    result = interpreted.run("prefill", **case)
    assert result["finite"], "output has NaN/inf: a row was not written or a poisoned slot leaked"
    assert result["rel_err"] < result["tolerance"], result


def test_triton_backend_mixed_step_matches_torch_backend(interpreted):
    """Decodes and prefill chunks in one step, the step's own K/V written by the backend."""
    result = interpreted.run("backend_step", dtype="float32", block_size=8, head_dim=32, num_kv_heads=2, group=3)
    assert result["finite"]
    assert result["rel_err_vs_torch_backend"] < 1e-4, result
    assert result["rel_err_vs_reference"] < 1e-4, result


def test_kernels_compile_for_orin_without_spills(compiler):
    """sm_87 (Jetson Orin) builds of every kernel, fp16 and fp32, head dim 128 (the largest
    tiles): no register spills, and shared memory within the 99 KB a consumer Ampere card
    (sm_86) gives one block, so the same tiles fit every edge target."""
    result = compiler.run("compile", arch=87)
    assert len(result["kernels"]) >= 8, result
    for name, usage in result["kernels"].items():
        assert usage["stack_bytes"] == 0, f"{name} spills: {usage}"
        assert usage["shared"] <= 99 * 1024, f"{name} needs too much shared memory: {usage}"


# ---------------------------------------------------------------------------------------------
# The child side: everything below runs only in the processes started by `_Child`.


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a loaded scalar into an index with int() on a 1-element
    array, which numpy >= 2.4 refuses, so any loop bounded by a loaded value fails
    (triton-lang/triton#9171). Index through the array's one element instead."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1))
        return
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _strided_copy(x, extra: int):
    """x as a view into a wider buffer, the way q/k/v come out of a fused QKV projection."""
    import torch

    wide = torch.full((x.shape[0], x.shape[1] + extra, x.shape[2]), float("nan"), dtype=x.dtype)
    wide[:, : x.shape[1]] = x
    return wide[:, : x.shape[1]]


def _check_write_kv(dtype, block_size, num_kv_heads, head_dim, slot_dtype, strided):
    import torch

    from edgepaged.kernels import write_kv
    from edgepaged.kernels.reference import write_kv_ref

    g = torch.Generator().manual_seed(1)
    dt = _dtype(dtype)
    num_blocks, num_tokens = 6, 19
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::4] = -1
    slots = slots.to(_dtype(slot_dtype))
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dt)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dt)
    if strided:
        key, value = _strided_copy(key, 2), _strided_copy(value, 1)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), dtype=dt) for _ in range(4)]
    write_kv(key, value, caches[0], caches[1], slots)
    write_kv_ref(key, value, caches[2], caches[3], slots)
    same = all(
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        for a, b in ((caches[0], caches[2]), (caches[1], caches[3]))
    )
    return {"equal_to_reference": same, "written": int((slots >= 0).sum()), "skipped": int((slots < 0).sum())}


def _check_decode(
    dtype,
    block_size,
    head_dim,
    num_kv_heads,
    group,
    context_lens,
    num_splits,
    shared_prefix_blocks=0,
    strided=False,
    plan_context=0,
):
    import torch

    from edgepaged.kernels import paged_decode_attention, plan_decode
    from edgepaged.kernels.reference import TOLERANCE, paged_decode_attention_ref, random_paged_kv, relative_error

    g = torch.Generator().manual_seed(2)
    dt = _dtype(dtype)
    kv = random_paged_kv(context_lens, block_size, num_kv_heads, head_dim, dt, "cpu", g, shared_prefix_blocks)
    num_q_heads = num_kv_heads * group
    q = torch.randn(len(context_lens), num_q_heads, head_dim, generator=g).to(dt)
    if strided:
        q = _strided_copy(q, 2 * num_kv_heads)
    scale = head_dim**-0.5
    plan_len = max(plan_context, *context_lens)
    plan = plan_decode(len(context_lens), num_q_heads, num_kv_heads, head_dim, plan_len, "cpu", num_splits=num_splits)
    for scratch in (plan.partial_out, plan.partial_max, plan.partial_sum):
        if scratch is not None:
            scratch.fill_(float("nan"))
    out = torch.full(q.shape, float("nan"), dtype=dt)
    paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, out=out, plan=plan)
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale)
    return {
        "finite": bool(out.isfinite().all()),
        "rel_err": relative_error(out, ref),
        "tolerance": TOLERANCE[dt],
        "num_splits": plan.num_splits,
    }


def _check_prefill(
    dtype,
    block_size,
    head_dim,
    num_kv_heads,
    group,
    context_lens,
    query_lens,
    shared_prefix_blocks=0,
    strided=False,
    pass_max_query_len=False,
):
    import torch

    from edgepaged.kernels import paged_prefill_attention
    from edgepaged.kernels.reference import TOLERANCE, paged_prefill_attention_ref, random_paged_kv, relative_error

    g = torch.Generator().manual_seed(3)
    dt = _dtype(dtype)
    kv = random_paged_kv(context_lens, block_size, num_kv_heads, head_dim, dt, "cpu", g, shared_prefix_blocks)
    num_q_heads = num_kv_heads * group
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), num_q_heads, head_dim, generator=g).to(dt)
    if strided:
        q = _strided_copy(q, 2 * num_kv_heads)
    scale = head_dim**-0.5
    out = torch.full(q.shape, float("nan"), dtype=dt)
    max_query_len = max(query_lens) if pass_max_query_len else None
    paged_prefill_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.context_lens, scale, out=out, max_query_len=max_query_len
    )
    ref = paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.context_lens, scale)
    return {"finite": bool(out.isfinite().all()), "rel_err": relative_error(out, ref), "tolerance": TOLERANCE[dt]}


def _check_backend_step(dtype, block_size, head_dim, num_kv_heads, group):
    import torch

    from edgepaged.attention import AttentionBatch
    from edgepaged.backends.torch_ref import TorchRefBackend
    from edgepaged.backends.triton import TritonBackend
    from edgepaged.kernels.reference import (
        paged_decode_attention_ref,
        paged_prefill_attention_ref,
        random_paged_step,
        relative_error,
        write_kv_ref,
    )

    g = torch.Generator().manual_seed(4)
    num_q_heads = num_kv_heads * group
    step = random_paged_step(
        [70, 9, 33], [40, 80], [40, 15], block_size, num_q_heads, num_kv_heads, head_dim, _dtype(dtype), "cpu", g
    )
    nd, kv = step.num_decode_tokens, step.kv
    prefill_ctx = kv.context_lens[nd:]
    batch = AttentionBatch(
        slot_mapping=step.slot_mapping,
        num_decode_tokens=nd,
        decode_block_tables=kv.block_tables[:nd],
        decode_context_lens=kv.context_lens[:nd],
        max_decode_context_len=int(kv.context_lens[:nd].max()),
        prefill_block_tables=kv.block_tables[nd:],
        prefill_query_start_loc=step.query_start_loc,
        prefill_context_lens=prefill_ctx,
        max_prefill_query_len=step.max_query_len,
        max_prefill_context_len=int(prefill_ctx.max()),
        block_size=block_size,
    )
    scale = head_dim**-0.5
    results = {}
    # The torch backend reads padded slots and masks them afterwards, so it needs the finite
    # (zeroed or stale) cache the runner guarantees; the Triton one must cope with NaN there.
    for backend, poisoned in (
        (TritonBackend(num_q_heads, num_kv_heads, head_dim, scale), True),
        (TorchRefBackend(num_q_heads, num_kv_heads, head_dim, scale), False),
    ):
        k_cache, v_cache = (c.clone() if poisoned else c.nan_to_num(0.0) for c in (kv.k_cache, kv.v_cache))
        results[backend.name] = backend.forward(step.q, step.k, step.v, k_cache, v_cache, backend.prepare(batch))
    k_cache, v_cache = kv.k_cache.clone(), kv.v_cache.clone()
    write_kv_ref(step.k, step.v, k_cache, v_cache, step.slot_mapping)
    ref = torch.cat(
        [
            paged_decode_attention_ref(
                step.q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, scale
            ),
            paged_prefill_attention_ref(
                step.q[nd:], k_cache, v_cache, batch.prefill_block_tables, step.query_start_loc, prefill_ctx, scale
            ),
        ]
    )
    out = results["triton"]
    return {
        "finite": bool(out.isfinite().all()),
        "rel_err_vs_torch_backend": relative_error(out, results["torch"]),
        "rel_err_vs_reference": relative_error(out, ref),
    }


def _check_compile(arch, head_dim=128, dtypes=("float16", "float32"), kv_dtype=None):
    """Record the launches the wrappers make for small problems, then compile exactly those
    launches (argument types, 16-divisibility hints and constants as the JIT would specialise
    them) for `arch` and read register spills from the cubin with the cuobjdump Triton ships.
    `kv_dtype` ("int8", "float8_e4m3fn") launches the 8-bit pool's variants instead."""
    import importlib
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from edgepaged.kernels import paged_decode_attention, paged_prefill_attention, plan_decode, write_kv
    from test_fused_decode import record_decode_gemv_launches

    # import_module, not attribute access: the package's `write_kv` function shadows its module.
    decode_mod, prefill_mod, write_mod, gemv_mod = (
        importlib.import_module(f"edgepaged.kernels.{name}")
        for name in ("paged_decode", "paged_prefill", "write_kv", "decode_gemv")
    )

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    targets = (
        (decode_mod, "_paged_decode_kernel"),
        (decode_mod, "_merge_splits_kernel"),
        (prefill_mod, "_paged_prefill_kernel"),
        (prefill_mod, "_paged_prefill_quant_kernel"),
        (write_mod, "_write_kv_kernel"),
        (write_mod, "_write_kv_quant_kernel"),
        (gemv_mod, "_decode_gemv_kernel"),
    )
    originals = [getattr(module, name) for module, name in targets]
    for (module, name), kernel in zip(targets, originals, strict=True):
        setattr(module, name, Recorder(kernel))
    try:
        num_kv_heads, group, block_size = 2, 4, 16
        for dt in map(_dtype, dtypes):
            shape = (8, block_size, num_kv_heads, head_dim)
            if kv_dtype is None:
                k_cache, scales = torch.zeros(shape, dtype=dt), {}
            else:
                k_cache = torch.zeros(shape, dtype=torch.uint8).view(_dtype(kv_dtype))
                scales = {"k_scale": torch.zeros(shape[:3], dtype=torch.float16)}
                scales["v_scale"] = torch.zeros_like(scales["k_scale"])
            v_cache = torch.zeros_like(k_cache)
            q = torch.zeros(4, num_kv_heads * group, head_dim, dtype=dt)
            tables = torch.zeros(4, 8, dtype=torch.int32)
            lens = torch.full((4,), 100, dtype=torch.int32)
            kv_rows = q[:, :num_kv_heads]
            write_kv(kv_rows, kv_rows, k_cache, v_cache, torch.zeros(4, dtype=torch.int64), **scales)
            for splits, merge in ((1, False), (2, False), (2, True)):
                plan = plan_decode(4, num_kv_heads * group, num_kv_heads, head_dim, 128, "cpu", num_splits=splits,
                                   merge_in_kernel=merge)
                paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1, plan=plan, **scales)
            if kv_dtype is None and dt == torch.float16:  # the model dtypes a CUDA profile runs
                record_decode_gemv_launches(torch.float16)
                record_decode_gemv_launches(torch.bfloat16)
            starts = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
            paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, 0.1, **scales)
    finally:
        for (module, name), kernel in zip(targets, originals, strict=True):
            setattr(module, name, kernel)

    type_names = {
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float32: "fp32",
        torch.int32: "i32",
        torch.int64: "i64",
        torch.int8: "i8",
        torch.float8_e4m3fn: "fp8e4nv",
    }
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = {}
    for kernel, args, kwargs in launches:
        signature, constexprs, attrs = {}, {}, {}
        values = dict(zip(kernel.arg_names, args, strict=False))  # the constexprs come as keywords
        values |= {k: v for k, v in kwargs.items() if k in kernel.arg_names}
        for i, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr or (isinstance(value, int) and value == 1):
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + type_names[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[param.name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            dump = subprocess.run(
                [cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
            ).stdout
        stack = [int(tok.split(":")[1]) for tok in dump.split() if tok.startswith("STACK:")]
        variant = "".join(
            f"-{key.lower()}" + ("" if constexprs[key] is True else str(constexprs[key]))
            for key in ("SPLIT", "MERGE", "EPILOGUE", "NORM", "GATHER", "K")
            if constexprs.get(key)
        )
        usage[f"{kernel.fn.__name__}{variant}-{signature[kernel.arg_names[0]]}"] = {
            "stack_bytes": max(stack),
            "shared": compiled.metadata.shared,
        }
    return {"kernels": usage}


_CHECKS = {
    "write_kv": _check_write_kv,
    "decode": _check_decode,
    "prefill": _check_prefill,
    "backend_step": _check_backend_step,
    "compile": _check_compile,
}


def _serve(checks: dict = _CHECKS) -> None:
    replies = sys.stdout
    sys.stdout = sys.stderr  # anything a kernel or library prints must not corrupt the replies
    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_interpreter_for_numpy_2_4()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": checks[request["check"]](**request["params"])}
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()

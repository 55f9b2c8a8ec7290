"""The W4A16 / W8A16 Triton kernels on the CPU: interpreted against the dequantize-then-F.linear
references, and compiled for Jetson Orin (sm_87) to prove they build without spilling.

As in tests/test_kernels.py, the interpreter must not be switched on in this pytest process, so
the checks run in child processes (this file, run as a script): one child interprets every case
once and answers with one JSON object, another compiles the launches the wrappers make. Outputs
and split-K scratch are NaN-filled by the allocator (a missed store shows as NaN, which never
passes). Cases cover fp16, bf16 and fp32 activations, the three kernel shapes (T=1 FMA decode, 2 <= T <= 16 tl.dot decode,
T > 16 GEMM, T >= 128 dequantized for F.linear), split-K forced on and off, ragged N, every group size, with and without bias.
bf16 runs only where no tl.dot does (T=1): the 3.6 interpreter multiplies bf16 bit patterns in
tl.dot (triton-lang/triton#11584); tests/test_quant_kernels_gpu.py runs bf16 everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TOLERANCE = 1e-2  # max |out - ref| / max |ref|, against the float32 reference


def _case(bits, dtype, tokens, k, n, group, bias, split_k=None):
    return {"bits": bits, "dtype": dtype, "tokens": tokens, "k": k, "n": n, "group": group, "bias": bias,
            "split_k": split_k}


CASES = [
    # int4, T = 1 (FMA decode)
    _case(4, "float16", 1, 256, 96, 32, True),
    _case(4, "float16", 1, 256, 32, 128, False, split_k=2),
    _case(4, "float16", 1, 64, 96, 64, True),
    _case(4, "bfloat16", 1, 256, 96, 64, True, split_k=3),
    # int4, 2 <= T <= 16 (tl.dot decode)
    _case(4, "float16", 3, 256, 96, 64, True, split_k=2),
    _case(4, "float16", 3, 64, 32, 32, False),
    _case(4, "float16", 16, 256, 96, 128, True, split_k=2),
    # int4, T > 16 (dequantizing GEMM), one and several row tiles
    _case(4, "float16", 17, 256, 96, 32, True),
    _case(4, "float16", 17, 64, 32, 64, False),
    _case(4, "float16", 70, 256, 160, 128, True),
    # T >= DENSE_MIN_TOKENS_DEFAULT (the interpreter's and sm_8x's threshold): dequantized into a dense matrix, then F.linear
    _case(4, "float16", 130, 256, 96, 32, True),
    _case(8, "float16", 128, 256, 96, 16, False),
    _case(4, "float32", 128, 256, 96, 128, False),
    # int8
    _case(8, "float16", 1, 256, 96, 16, True, split_k=3),
    _case(8, "float16", 1, 64, 32, 32, False),
    _case(8, "bfloat16", 1, 256, 96, 128, False),
    _case(8, "float16", 3, 256, 96, 32, True),
    _case(8, "float16", 3, 64, 32, 16, True, split_k=2),
    _case(8, "float16", 5, 256, 96, 128, False, split_k=2),
    _case(8, "float16", 17, 256, 96, 16, False),
    _case(8, "float16", 17, 64, 32, 32, True),
    # fp32 activations (exact dots), each kernel shape
    _case(4, "float32", 1, 256, 96, 32, True, split_k=2),
    _case(4, "float32", 4, 256, 96, 128, False),
    _case(4, "float32", 40, 256, 96, 64, True),
    _case(8, "float32", 40, 128, 32, 16, False),
]


def _id(case: dict) -> str:
    split = f"-split{case['split_k']}" if case["split_k"] else ""
    bias = "-bias" if case["bias"] else ""
    return f"w{case['bits']}-{case['dtype']}-t{case['tokens']}-k{case['k']}-n{case['n']}-g{case['group']}{bias}{split}"


def _child(mode: str, interpret: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, mode], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{mode} child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    return _child("interpret", interpret=True)


@pytest.fixture(scope="module")
def compiled() -> dict:
    return _child("compile", interpret=False)


def assert_matches_reference(r: dict) -> None:
    assert r["finite"], f"NaN/inf in the output: an unwritten element or a read past the weights: {r}"
    assert r["dtype_ok"], f"the output must be [T, N] in x's dtype: {r}"
    assert r["rel_err"] < TOLERANCE, r
    if r["forced_split"]:
        assert r["splits"] > 1, f"the case was meant to exercise split-K: {r}"


@pytest.mark.parametrize("i", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_quant_linear_matches_reference(interpreted, i):
    assert_matches_reference(interpreted[i])


def test_kernels_compile_for_orin_and_hopper_without_spills(compiled):
    """sm_87 (Jetson Orin) and sm_90 builds of each kernel shape, fp16, bf16 and fp32: no register
    spills, and shared memory within the 99 KB a consumer Ampere card (sm_86) gives one block.
    A tl.dot operand under 16 in any dimension, or a layout the backend cannot lower, fails here."""
    kernels = compiled["kernels"]
    assert sum(name.startswith("sm87-") for name in kernels) >= 20, kernels
    assert sum(name.startswith("sm90-") for name in kernels) >= 10, kernels
    for name, usage in kernels.items():
        assert usage["stack_bytes"] == 0, f"{name} spills: {usage}"
        assert usage["shared"] <= 99 * 1024, f"{name} needs too much shared memory: {usage}"


def test_plan_splits_decode_for_a_big_gpu_only():
    from edgepaged.kernels.quant_matmul import plan_quant_decode

    cpu = plan_quant_decode(1, 2048, 2048, 128, 4, "cpu")
    assert cpu.splits == 1 and cpu.block_t == 1
    forced = plan_quant_decode(4, 2048, 2048, 32, 4, "cpu", split_k=4)
    assert forced.block_t == 16 and forced.splits == 4 and forced.groups_per_split * 4 == 2048 // 32


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": torch.zeros(2, 64, dtype=torch.float64)}, "fp16/bf16"),
        ({"group_size": 48}, "group_size"),
        ({"group_size": 16, "scales": torch.zeros(8, 4, dtype=torch.float16),
          "offsets": torch.zeros(8, 4, dtype=torch.float16)}, "int4 group_size"),
        ({"qweight": torch.zeros(8, 64, dtype=torch.uint8)}, "qweight"),
        ({"scales": torch.zeros(8, 1, dtype=torch.float16)}, "scales"),
        ({"offsets": torch.zeros(4, 2, dtype=torch.float16)}, "offsets"),
        ({"bias": torch.zeros(4, dtype=torch.float16)}, "bias"),
    ],
)
def test_bad_inputs_are_rejected_before_launch(change, message):
    from edgepaged.kernels import w4a16_linear

    args = {
        "x": torch.zeros(2, 64, dtype=torch.float16),
        "qweight": torch.zeros(8, 32, dtype=torch.uint8),
        "scales": torch.zeros(8, 2, dtype=torch.float16),
        "offsets": torch.zeros(8, 2, dtype=torch.float16),
        "group_size": 32,
        "bias": None,
    } | change
    with pytest.raises(ValueError, match=message):
        w4a16_linear(**args)


# ---------------------------------------------------------------------------------------------
# The checks: run by the children on the CPU and in-process by tests/test_quant_kernels_gpu.py.


def kernel_shape(tokens: int) -> str:
    from edgepaged.kernels.quant_matmul import DENSE_MIN_TOKENS_DEFAULT

    return "gemv" if tokens == 1 else "gemv-dot" if tokens <= 16 else "gemm" if tokens < DENSE_MIN_TOKENS_DEFAULT else "dequantize+dense"


def quantized_weight(bits, k, n, group, device="cpu", seed=0) -> tuple[torch.Tensor, ...]:
    """A random [N, K] weight (std 0.05) in the kernels' packed layout, made on `device`."""
    from edgepaged.kernels.quant_reference import quantize_int4, quantize_int8

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    return quantize_int4(w, group) if bits == 4 else quantize_int8(w, group)


def activations(dtype, tokens, k, n, bias, device="cpu", seed=1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, K] ~ N(0, 1) and, with `bias`, a bias [N] ~ N(0, 0.25), in `dtype` on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    x = torch.randn(tokens, k, generator=g, device=device).to(dt)
    b = (torch.randn(n, generator=g, device=device) * 0.5).to(dt) if bias else None
    return x, b


def check_launch(x, packed, bits, group, bias, split_k=None) -> dict:
    """One call of the wrapper against its float32 reference; outputs and scratch start as NaN."""
    from test_fused_kernels import _nan_allocations

    from edgepaged.kernels import w4a16_linear, w8a16_linear
    from edgepaged.kernels.quant_matmul import plan_quant_decode
    from edgepaged.kernels.quant_reference import w4a16_linear_ref, w8a16_linear_ref
    from edgepaged.kernels.reference import relative_error

    (tokens, k), n = x.shape, packed[0].shape[0]
    kernel, ref = (w4a16_linear, w4a16_linear_ref) if bits == 4 else (w8a16_linear, w8a16_linear_ref)
    with _nan_allocations():
        out = kernel(x, *packed, group, bias, split_k=split_k)
    expected = ref(x, *packed, group, bias)
    splits = plan_quant_decode(tokens, n, k, group, bits, x.device, split_k, x.dtype).splits if tokens <= 16 else 1
    return {
        "finite": bool(out.isfinite().all()),
        "rel_err": relative_error(out, expected),
        "dtype_ok": out.dtype == x.dtype and out.shape == (tokens, n),
        "kernel": kernel_shape(tokens),
        "splits": splits,
        "forced_split": bool(split_k and split_k > 1),
    }


def run_case(bits, dtype, tokens, k, n, group, bias, split_k=None, device="cpu") -> dict:
    x, b = activations(dtype, tokens, k, n, bias, device)
    return check_launch(x, quantized_weight(bits, k, n, group, device), bits, group, b, split_k)


def _interpret_all() -> list[dict]:
    from test_kernels import _patch_interpreter_for_numpy_2_4

    _patch_interpreter_for_numpy_2_4()
    return [run_case(**case) for case in CASES]


def _compile_all() -> dict:
    """Record the launches the wrappers make for small problems (each kernel shape, fp16, bf16
    and fp32, int4 and int8, smallest and largest group), then compile exactly those launches as
    the JIT would specialise them, for sm_87 and (bf16 only: the H200 runs the rest for real)
    sm_90, and read register spills from the cubins."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import edgepaged.kernels.quant_matmul as qm

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    names = ("_quant_gemv_kernel", "_split_k_merge_kernel", "_quant_gemm_kernel", "_dequantize_kernel")
    originals = {name: getattr(qm, name) for name in names}
    for name, kernel in originals.items():
        setattr(qm, name, Recorder(kernel))
    try:
        for dtype in ("float16", "bfloat16", "float32"):
            for bits, group in ((4, 32), (4, 128), (8, 16), (8, 128)):
                for tokens, split_k in ((1, 2), (8, 2), (64, None), (qm.DENSE_MIN_TOKENS_DEFAULT, None)):
                    x, b = activations(dtype, tokens, 1024, 256, bias=True)
                    fn = qm.w4a16_linear if bits == 4 else qm.w8a16_linear
                    fn(x, *quantized_weight(bits, 1024, 256, group), group, b, split_k=split_k)
    finally:
        for name, kernel in originals.items():
            setattr(qm, name, kernel)

    type_names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
                  torch.int8: "i8"}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = {}
    targets = [(87, launch) for launch in launches]
    targets += [(90, launch) for launch in launches  # bf16 activations (or dequantized weights)
                if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in launch[1])]
    for arch, (kernel, args, kwargs) in targets:
        values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr or (isinstance(value, int) and value == 1 and not param.do_not_specialize):
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + type_names[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # fresh CPU allocations are 64-byte aligned
            else:
                signature[param.name] = "i32"
                if value % 16 == 0 and not param.do_not_specialize:
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
        shape = "-".join(f"{k}{v}" for k, v in constexprs.items() if k in ("BITS", "GROUP", "BLOCK_T", "BLOCK_M"))
        key = f"sm{arch}-{kernel.fn.__name__}-{shape}-{signature.get('x_ptr', signature.get('out_ptr', signature.get('w_ptr')))}"
        usage[key] = {"stack_bytes": max(stack), "shared": compiled.metadata.shared}
    return {"kernels": usage}


if __name__ == "__main__":
    replies = sys.stdout
    sys.stdout = sys.stderr  # anything a kernel or library prints must not corrupt the reply
    result = _interpret_all() if sys.argv[1] == "interpret" else _compile_all()
    replies.write(json.dumps(result) + "\n")

"""On a CUDA GPU: launch our Triton kernels exactly as TensorRT's AOT plugins launch them, and check them.

For every case (dtype x attention shape x step mix) the two plugin kernels are compiled by
`edgepaged.backends.tensorrt.plugin` for this GPU, as the plugins' `aot_impl` compiles them: PTX
with the engine's fixed arguments baked in, its parameters rewritten into TensorRT's order and
Triton's hidden scratch pointers removed. The PTX is loaded with cuModuleLoadData and launched
with cuLaunchKernel (cuda-bindings) with only the declared arguments, in TensorRT's order: the
input pointers, the extra int32 arguments, the output pointers (the aliased pools passed again).
No Triton launcher is involved. The step is a random paged layout from kernels/reference.py:
blocks out of order, a prefix block shared by sequences, every free slot NaN, this step's slots
NaN until written. Checked against the references (`write_kv_ref`, `paged_prefill_attention_ref`)
and against the same kernel launched by Triton's own launcher; both launches are timed.

Prints a table and writes JSON; exits 1 if any case fails.

    python scripts/check_aot_launch_gpu.py --out docs/benchmarks/tensorrt-aot-launch-h100.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from run_report import gpu_run_facts
from triton.testing import do_bench

from edgepaged.backends.tensorrt import cuda_driver_version
from edgepaged.backends.tensorrt.plugin import AotKernel, compile_paged_attend, compile_write_kv, ptx_version_for
from edgepaged.kernels import paged_prefill_attention
from edgepaged.kernels.reference import (
    TOLERANCE,
    paged_prefill_attention_ref,
    random_paged_step,
    relative_error,
    write_kv_ref,
)

# (name, query heads, KV heads, head dim, block size)
SHAPES = [
    ("smollm2-135m", 9, 3, 64, 16),
    ("llama-3.2-1b", 32, 8, 64, 16),
    ("llama-3.1-8b", 32, 8, 128, 16),
    ("qwen2.5-0.5b", 14, 2, 64, 32),
    ("mha-d128-bs8", 4, 4, 128, 8),
]
# (name, decode context lens, prefill context lens, prefill query lens)
STEPS = [
    ("decode x8", [1, 17, 63, 64, 65, 300, 513, 1000], [], []),
    ("prefill x3", [], [37, 200, 640], [37, 200, 640]),
    ("mixed", [5, 129, 700], [90, 1100, 33], [90, 48, 1]),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@dataclass(slots=True)
class Case:
    dtype: str
    shape: str
    step: str
    tokens: int
    write_exact: bool
    attend_error: float  # max |aot - ref| / max |ref|
    tolerance: float
    aot_vs_jit: float  # max |aot - jit| / max |jit|
    aot_us: float
    jit_us: float
    shared_bytes: int
    threads: int

    @property
    def ok(self) -> bool:
        return self.write_exact and self.attend_error <= self.tolerance


class Driver:
    """The CUDA driver calls a TensorRT-style launcher makes, through cuda-bindings."""

    def __init__(self) -> None:
        from cuda.bindings import driver

        self.cu = driver
        torch.zeros(1, device="cuda")  # makes torch's primary context current on this thread
        self.functions: dict[str, object] = {}

    def check(self, result):
        err, *values = result
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver error {err}: {self.cu.cuGetErrorString(err)[1]}")
        return values[0] if len(values) == 1 else values

    def function(self, kernel: AotKernel):
        key = kernel.ptx
        if key not in self.functions:
            module = self.check(self.cu.cuModuleLoadData(kernel.ptx.encode() + b"\0"))
            self.functions[key] = self.check(self.cu.cuModuleGetFunction(module, kernel.name.encode()))
        return self.functions[key]

    def launch(self, kernel: AotKernel, grid, inputs: list[torch.Tensor], extra: tuple[int, ...], outputs: list[torch.Tensor]) -> None:
        """cuLaunchKernel with exactly the declared parameters: inputs, int32 extras, outputs."""
        values = [ctypes.c_void_p(t.data_ptr()) for t in inputs]
        values += [ctypes.c_int32(v) for v in extra]
        values += [ctypes.c_void_p(t.data_ptr()) for t in outputs]
        assert len(values) == len(kernel.abi), (kernel.abi, len(values))
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        stream = self.cu.CUstream(torch.cuda.current_stream().cuda_stream)
        self.check(self.cu.cuLaunchKernel(
            self.function(kernel), *grid, kernel.num_threads, 1, 1, kernel.shared_mem, stream, ctypes.addressof(params), 0,
        ))


def run_case(driver: Driver, target, ptx_version, dtype, shape, step_spec, gen) -> Case:
    name, hq, hkv, dim, block_size = shape
    step_name, decode_lens, prefill_lens, query_lens = step_spec
    step = random_paged_step(decode_lens, prefill_lens, query_lens, block_size, hq, hkv, dim, dtype, "cuda", gen)
    kv = step.kv
    nd = step.num_decode_tokens
    # Every sequence of the step in one table: decodes are chunks of one query.
    starts = torch.cat([torch.arange(nd + 1, dtype=torch.int32, device="cuda"), step.query_start_loc[1:] + nd])
    scale = dim**-0.5
    write = compile_write_kv(dtype, step.slot_mapping.dtype, hkv, dim, block_size, target, ptx_version)
    attend = compile_paged_attend(dtype, hq, hkv, dim, block_size, scale, target, ptx_version)
    num_tokens, num_seqs, width = step.q.shape[0], kv.context_lens.shape[0], kv.block_tables.shape[1]

    k_ref, v_ref = kv.k_cache.clone(), kv.v_cache.clone()
    write_kv_ref(step.k, step.v, k_ref, v_ref, step.slot_mapping)
    k_cache, v_cache = kv.k_cache.clone(), kv.v_cache.clone()
    driver.launch(write.kernel, write.grid(num_tokens), [step.k, step.v, k_cache, v_cache, step.slot_mapping],
                  write.extra_args(), [k_cache, v_cache])
    torch.cuda.synchronize()
    write_exact = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in ((k_cache, k_ref), (v_cache, v_ref)))

    out = torch.full_like(step.q, float("nan"))
    inputs = [step.q, k_cache, v_cache, kv.block_tables, starts, kv.context_lens]
    run_aot = lambda: driver.launch(attend.kernel, attend.grid(num_tokens, num_seqs), inputs, attend.extra_args(width), [out])
    run_aot()
    ref = paged_prefill_attention_ref(step.q, k_ref, v_ref, kv.block_tables, starts, kv.context_lens, scale)
    jit_out = torch.empty_like(step.q)
    max_query = max([1] + query_lens)
    run_jit = lambda: paged_prefill_attention(step.q, k_cache, v_cache, kv.block_tables, starts, kv.context_lens, scale,
                                              out=jit_out, max_query_len=max_query)
    run_jit()
    torch.cuda.synchronize()
    return Case(
        dtype=str(dtype).removeprefix("torch."),
        shape=name,
        step=step_name,
        tokens=num_tokens,
        write_exact=write_exact,
        attend_error=relative_error(out, ref),
        tolerance=TOLERANCE[dtype],
        aot_vs_jit=relative_error(out, jit_out),
        aot_us=do_bench(run_aot, return_mode="median") * 1e3,
        jit_us=do_bench(run_jit, return_mode="median") * 1e3,
        shared_bytes=attend.kernel.shared_mem,
        threads=attend.kernel.num_threads,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    driver = Driver()
    target = triton.runtime.driver.active.get_current_target()
    driver_cuda = cuda_driver_version()
    ptx_version = ptx_version_for(driver_cuda, target.arch)
    gen = torch.Generator().manual_seed(0)
    cases = [run_case(driver, target, ptx_version, d, s, st, gen) for d in DTYPES for s in SHAPES for st in STEPS]

    print(f"{torch.cuda.get_device_name()}: sm_{target.arch}, driver CUDA {driver_cuda}, PTX ISA {ptx_version / 10:.1f}")
    print(f"{'dtype':9} {'shape':13} {'step':11} {'T':>5} {'write':>5} {'rel err':>9} {'tol':>7} "
          f"{'vs jit':>9} {'aot us':>8} {'jit us':>8} {'smem':>6}  result")
    for c in cases:
        print(f"{c.dtype:9} {c.shape:13} {c.step:11} {c.tokens:5} {'exact' if c.write_exact else 'DIFF':>5} "
              f"{c.attend_error:9.2e} {c.tolerance:7.0e} {c.aot_vs_jit:9.2e} {c.aot_us:8.1f} {c.jit_us:8.1f} "
              f"{c.shared_bytes:6}  {'ok' if c.ok else 'FAIL'}")
    failed = [c for c in cases if not c.ok]
    print(f"\n{len(cases) - len(failed)} passed, {len(failed)} failed")

    result = {
        **gpu_run_facts(),
        "compute_capability": target.arch,
        "driver_cuda": driver_cuda,
        "ptx_version": ptx_version,
        "launch": "cuModuleLoadData + cuLaunchKernel with (inputs, int32 extras, outputs) only",
        "cases": [asdict(c) | {"ok": c.ok} for c in cases],
        "passed": len(cases) - len(failed),
        "failed": len(failed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

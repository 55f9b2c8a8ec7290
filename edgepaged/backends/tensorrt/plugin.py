"""The TensorRT plugins behind the graph's attention, carrying our Triton kernels as PTX.

TensorRT's quickly deployable plugins (`tensorrt.plugin`) take an ahead-of-time implementation
(TensorRT >= 10.9): the plugin hands TensorRT one kernel's PTX and its launch geometry, TensorRT
embeds both in the engine and launches the kernel itself, so the engine runs without Python.
One plugin launches one kernel, and an exported `edgepaged::paged_attention` node needs two
(write the step's K/V into the pools, then attend), so before parsing, `lower_for_tensorrt`
replaces each by `edgepaged::write_kv` (our `write_kv` kernel; its outputs are its pool inputs,
aliased, which is how the pools are updated in place) followed by `edgepaged::paged_attend` (our
`paged_prefill_attention` kernel over every sequence of the step: a decode is a chunk of one
query, so one launch covers decodes and prefill chunks).

TensorRT launches an AOT kernel with its arguments in a fixed order: the plugin's input
pointers, the extra integer arguments, the output pointers. Triton declares parameters in the
kernel's own order and appends two hidden scratch pointers (global and profile scratch), which
its own launcher fills. So each kernel is compiled with every argument that is fixed for an
engine (strides of contiguous tensors, head counts, tile sizes) as a compile-time constant, and
its PTX parameter list is rewritten into TensorRT's order: parameters reordered, an unused
parameter declared where TensorRT passes a pointer the kernel does not read (the aliased pool
outputs), the scratch parameters dropped, which is only legal while both scratch sizes are 0
and is checked. `scripts/check_aot_launch_gpu.py` launches exactly this PTX with exactly these
arguments through the CUDA driver and compares with the references.

No `from __future__ import annotations` here: `tensorrt.plugin` reads the registration
functions' annotations as classes.
"""

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Tuple, Union

import onnx
import torch
import triton
from onnx import helper
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import cuda_driver_version
from .export import ATTENTION_OP, DOMAIN

# The kernel modules themselves (the package re-exports a function under the name `write_kv`).
_decode = importlib.import_module("...kernels.paged_decode", __package__)
_prefill = importlib.import_module("...kernels.paged_prefill", __package__)
_write_kv = importlib.import_module("...kernels.write_kv", __package__)

WRITE_KV_OP = "write_kv"
ATTEND_OP = "paged_attend"

# Dynamic shared memory a kernel may use without the launcher opting in to more.
_STATIC_SHARED_LIMIT = 48 * 1024

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True, slots=True)
class AotKernel:
    """One kernel compiled for TensorRT's AOT launch: PTX whose parameters are in TensorRT's order.

    `abi` names every parameter in launch order: "in:<kernel arg>", "arg:<kernel arg>" (an extra
    int32 argument), "out:<kernel arg>", or "in:-" / "out:-" for a pointer the kernel ignores.
    """

    name: str
    ptx: str
    num_threads: int
    shared_mem: int
    abi: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WriteKvLaunch:
    """`write_kv` as plugin `write_kv`: inputs (key, value, k_cache, v_cache, slot_mapping),
    outputs (k_cache, v_cache) aliased to the inputs; one program per token."""

    kernel: AotKernel

    def grid(self, num_tokens):
        return (num_tokens, 1, 1)

    def extra_args(self) -> tuple:
        return ()


@dataclass(frozen=True, slots=True)
class AttendLaunch:
    """`paged_prefill_attention` as plugin `paged_attend`: inputs (q, k_cache, v_cache,
    block_tables, query_start_loc, context_lens), one extra argument (the block table's width),
    output out [T, Hq, D].

    The grid is sized by the step's token count, not its longest chunk (a shape cannot say
    that); tiles past a sequence's chunk return at once. The arithmetic is written with + and //
    only, so it takes ints (the check script) and TensorRT's symbolic shape expressions alike.
    """

    kernel: AotKernel
    num_kv_heads: int
    block_q: int

    def grid(self, num_tokens, num_seqs):
        return (num_seqs, (num_tokens + self.block_q - 1) // self.block_q, self.num_kv_heads)

    def extra_args(self, block_table_width) -> tuple:
        return (block_table_width,)


def ptx_version_for(driver_version: str | None, arch: int) -> int | None:
    """The newest PTX ISA both Triton's ptxas and the driver understand (None: Triton's choice).

    The engine's PTX is JIT-compiled by the driver that loads it, and Triton otherwise targets
    its bundled ptxas, which may be newer than a Jetson's driver.
    """
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    ours = ptx_get_version(get_ptxas(arch).version)
    return ours if driver_version is None else min(ours, ptx_get_version(driver_version))


def rewrite_params(ptx: str, kernel_name: str, order: list[int | str]) -> str:
    """PTX with the entry's parameters declared in `order`: an int keeps that original parameter,
    a str (".u64", ".u32") declares an unused one. Dropped parameters must be unreferenced."""
    head_start = ptx.index(f".entry {kernel_name}(")
    open_paren = ptx.index("(", head_start)
    close_paren = ptx.index(")", open_paren)
    declared = [d.strip() for d in ptx[open_paren + 1 : close_paren].split(",") if d.strip()]
    prefix = f"{kernel_name}_param_"
    kept = []
    for position, item in enumerate(order):
        kept.append(declared[item] if isinstance(item, int) else f".param {item} {kernel_name}_abi_{position}")
    body = ptx[close_paren:]
    for index, declaration in enumerate(declared):
        if index not in order and re.search(rf"\b{prefix}{index}\b", body):
            raise ValueError(f"{kernel_name}: parameter {index} ({declaration}) is used by the kernel and cannot be dropped")
    params = ",\n".join(f"\t{d}" for d in kept)
    return f"{ptx[: open_paren + 1]}\n{params}\n{body}"


def _compile_aot(fn, *, pointer_types: dict[str, torch.dtype], int_args: list[str], constants: dict, abi: list[str],
                 num_warps: int, num_stages: int, target: GPUTarget, ptx_version: int | None) -> AotKernel:
    """Compile `fn` with `constants` baked in and rewrite its PTX parameters into `abi` order."""
    signature, attrs = {}, {}
    runtime_params = []
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in constants:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + _TRITON_TYPES[pointer_types[name]]
            attrs[(index,)] = [["tt.divisibility", 16]]  # TensorRT and torch buffers are 256-byte aligned
            runtime_params.append(name)
        elif name in int_args:
            signature[name] = "i32"
            runtime_params.append(name)
        else:
            raise ValueError(f"{fn.__name__}: argument {name} is neither a constant, a pointer nor an int argument")
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constants, attrs=attrs),
        target=target,
        options=dict(num_warps=num_warps, num_stages=num_stages, ptx_version=ptx_version),
    )
    md = compiled.metadata
    if md.global_scratch_size or md.profile_scratch_size:
        raise ValueError(f"{md.name} needs scratch memory, which TensorRT's AOT launch cannot provide")
    if md.shared > _STATIC_SHARED_LIMIT:
        raise ValueError(f"{md.name} needs {md.shared} bytes of shared memory; a launcher that does not opt in "
                         f"(cuFuncSetAttribute) gets {_STATIC_SHARED_LIMIT}: choose smaller tiles")
    order: list[int | str] = []
    for slot in abi:
        name = slot.partition(":")[2]
        if name == "-":
            order.append(".u64")
        else:
            order.append(runtime_params.index(name))
    return AotKernel(md.name, rewrite_params(compiled.asm["ptx"], md.name, order), md.num_warps * 32, md.shared, tuple(abi))


def _contiguous_strides(*shape: int) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=None)
def compile_write_kv(dtype: torch.dtype, slot_dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int,
                     target: GPUTarget, ptx_version: int | None = None) -> WriteKvLaunch:
    """`write_kv` for contiguous key/value [T, Hkv, D] and pools [blocks, block_size, Hkv, D]."""
    row, head, _ = _contiguous_strides(1, num_kv_heads, head_dim)
    cb, cs, ch, _ = _contiguous_strides(1, block_size, num_kv_heads, head_dim)
    constants = dict(
        stride_kt=row, stride_kh=head, stride_vt=row, stride_vh=head,
        stride_kcb=cb, stride_kcs=cs, stride_kch=ch, stride_vcb=cb, stride_vcs=cs, stride_vch=ch,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
    )
    kernel = _compile_aot(
        _write_kv._write_kv_kernel,
        pointer_types=dict(key_ptr=dtype, value_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, slot_mapping_ptr=slot_dtype),
        int_args=[],
        constants=constants,
        abi=["in:key_ptr", "in:value_ptr", "in:k_cache_ptr", "in:v_cache_ptr", "in:slot_mapping_ptr", "out:-", "out:-"],
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
        num_stages=3,
        target=target,
        ptx_version=ptx_version,
    )
    return WriteKvLaunch(kernel)


@functools.lru_cache(maxsize=None)
def compile_paged_attend(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                         scale: float, target: GPUTarget, ptx_version: int | None = None) -> AttendLaunch:
    """`paged_prefill_attention` for contiguous q/out [T, Hq, D] and pools [blocks, block_size, Hkv, D],
    with the tiles its launcher would choose."""
    if num_q_heads % num_kv_heads or head_dim > 128 or block_size & (block_size - 1):
        raise ValueError(f"unsupported attention shape: {num_q_heads} query heads, {num_kv_heads} KV heads, "
                         f"head dim {head_dim}, block size {block_size}")
    queries_per_kv = num_q_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = _prefill._tile_shape(head_dim, dtype)
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    row, head, _ = _contiguous_strides(1, num_q_heads, head_dim)
    cb, cs, ch, _ = _contiguous_strides(1, block_size, num_kv_heads, head_dim)
    constants = dict(
        queries_per_kv=queries_per_kv, block_q=block_q,
        stride_qt=row, stride_qh=head, stride_ot=row, stride_oh=head,
        stride_kb=cb, stride_ks=cs, stride_kh=ch, stride_vb=cb, stride_vs=cs, stride_vh=ch,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, QK_SCALE=float(scale) * _decode.LOG2E, DOT_PRECISION=_decode.dot_precision(dtype),
    )
    kernel = _compile_aot(
        _prefill._paged_prefill_kernel,
        pointer_types=dict(
            out_ptr=dtype, q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype,
            block_tables_ptr=torch.int32, query_start_loc_ptr=torch.int32, context_lens_ptr=torch.int32,
        ),
        int_args=["stride_bt"],
        constants=constants,
        abi=["in:q_ptr", "in:k_cache_ptr", "in:v_cache_ptr", "in:block_tables_ptr", "in:query_start_loc_ptr",
             "in:context_lens_ptr", "arg:stride_bt", "out:out_ptr"],
        num_warps=num_warps,
        num_stages=num_stages,
        target=target,
        ptx_version=ptx_version,
    )
    return AttendLaunch(kernel, num_kv_heads, block_q)


def lower_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each `paged_attention` node split into `write_kv` + `paged_attend` nodes.

    The new nodes carry what TensorRT's ONNX parser needs to find the plugins (op type = plugin
    name, attribute `plugin_namespace`) and `aot=1`, which makes it take the AOT implementation.
    The model is modified in place and returned.
    """
    nodes = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != ATTENTION_OP:
            nodes.append(node)
            continue
        q, key, value, k_cache, v_cache, block_tables, context_lens, slot_mapping, query_start_loc = node.input
        out, k_cache_out, v_cache_out = node.output
        scale = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "scale")
        marks = dict(plugin_namespace=DOMAIN, aot=1)
        nodes.append(helper.make_node(
            WRITE_KV_OP, [key, value, k_cache, v_cache, slot_mapping], [k_cache_out, v_cache_out],
            name=f"{node.name}.write_kv", domain=DOMAIN, **marks,
        ))
        nodes.append(helper.make_node(
            ATTEND_OP, [q, k_cache_out, v_cache_out, block_tables, query_start_loc, context_lens], [out],
            name=f"{node.name}.attend", domain=DOMAIN, scale=scale, **marks,
        ))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


_registered = False


def register_plugins() -> None:
    """Register both plugins with TensorRT (once per process); needed only to build engines."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                    trt.int32: torch.int32, trt.int64: torch.int64}
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    def target_and_ptx() -> tuple[GPUTarget, int | None]:
        target = triton.runtime.driver.active.get_current_target()
        return target, ptx_version_for(cuda_driver_version(), target.arch)

    def launch(kernel: AotKernel, grid, extra_args) -> AotResult:
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x = kernel.num_threads
        params.shared_mem = kernel.shared_mem
        args = trtp.SymIntExprs(len(extra_args))
        for i, value in enumerate(extra_args):
            args[i] = trtp.SymInt32(value)
        return kernel.name, kernel.ptx, params, args

    @trtp.register(f"{DOMAIN}::{WRITE_KV_OP}")
    def write_kv_desc(key: trtp.TensorDesc, value: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                      slot_mapping: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return k_cache.aliased(), v_cache.aliased()

    @trtp.aot_impl(f"{DOMAIN}::{WRITE_KV_OP}")
    def write_kv_aot(key: trtp.TensorDesc, value: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                     slot_mapping: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int) -> AotResult:
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        w = compile_write_kv(torch_dtypes[k_cache.dtype], torch_dtypes[slot_mapping.dtype], num_kv_heads, head_dim,
                             block_size, *target_and_ptx())
        return launch(w.kernel, w.grid(slot_mapping.shape_expr[0]), w.extra_args())

    @trtp.register(f"{DOMAIN}::{ATTEND_OP}")
    def attend_desc(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, block_tables: trtp.TensorDesc,
                    query_start_loc: trtp.TensorDesc, context_lens: trtp.TensorDesc, scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl(f"{DOMAIN}::{ATTEND_OP}")
    def attend_aot(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, block_tables: trtp.TensorDesc,
                   query_start_loc: trtp.TensorDesc, context_lens: trtp.TensorDesc, scale: float,
                   outputs: Tuple[trtp.TensorDesc], tactic: int) -> AotResult:
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        a = compile_paged_attend(torch_dtypes[q.dtype], q.shape[1], num_kv_heads, head_dim, block_size, scale, *target_and_ptx())
        grid = a.grid(q.shape_expr[0], context_lens.shape_expr[0])
        return launch(a.kernel, grid, a.extra_args(block_tables.shape_expr[1]))

    _registered = True

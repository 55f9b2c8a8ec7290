"""Matrix-vector kernels for a batch-1 decode step, with the elementwise work around each
projection folded into the same launch.

At batch 1 a small model's step is bound by launches, not bytes: SmolLM2-135M moves 270 MB of
weights per token, 60 us at the H200's bandwidth, but ran ~340 kernels of a few microseconds
each. One row x [K] times W^T (W [N, K], nn.Linear's layout) is cheap to recompute around, so:

- prologue `NORM`: every program recomputes rmsnorm(x + residual) * weight from the raw row
  (K <= 8192 values, read from L2), and program 0 also writes x + residual, the next residual
  stream. The layer's separate add+norm kernel disappears. `GATHER` reads x as a row of the
  embedding table (the first layer), so the embedding lookup goes too.
- epilogue `SILU_MUL`: W is gate_up [2I, K]; a program owns outputs n of gate and n + I of up,
  so silu(gate) * up is elementwise in registers.
- epilogue `ROPE_KV`: W is the fused QKV [Hq*D + 2*Hkv*D, K]; a program owns dims d and
  d + D/2 of the same head, so rope rotates in registers; q goes to the output, k and v go
  straight into their paged cache slot.
- epilogue `ARGMAX`: each program keeps (max, first argmax) of its logits; the last program to
  finish reduces them (a counter in global memory orders the hand-off), so greedy sampling at
  batch 1 is the lm_head launch itself.

Rounding follows the eager ops (the projection's output rounded to the model dtype before any
elementwise step, each elementwise op rounded as `kernels.fused` rounds it), so the tokens of a
fused step equal the unfused one's unless a float32 accumulation order flips a rounding. Shapes
come from tensor shapes and nothing is read back to the host, so every launch can be captured
in a CUDA graph. Only portable instructions (no Hopper-only ones): the same code compiles for
sm_87 (Orin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PLAIN, SILU_MUL, ROPE_KV, ARGMAX = 0, 1, 2, 3


@triton.jit
def _summed_chunk(x_row, residual_row, offs_k, k_mask, HAS_RESIDUAL: tl.constexpr):
    """Columns offs_k of x (+ residual, rounded as the eager add), as fp32."""
    x = tl.load(x_row + offs_k, mask=k_mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_row + offs_k, mask=k_mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _normed_chunk(x, norm_w_ptr, offs_k, k_mask, rstd):
    """weight * rmsnorm(x) on columns offs_k, rounded as RMSNorm.forward rounds it, as fp32."""
    w = tl.load(norm_w_ptr + offs_k, mask=k_mask, other=0.0)
    normed = (x * rstd).to(w.dtype)
    return (w.to(tl.float32) * normed.to(tl.float32)).to(w.dtype).to(tl.float32)


@triton.jit
def _input_chunk(x_row, residual_row, norm_w_ptr, offs_k, k_mask, rstd, NORM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr):
    """Columns offs_k of the projection's input, as fp32 holding model-dtype values."""
    x = _summed_chunk(x_row, residual_row, offs_k, k_mask, HAS_RESIDUAL)
    if NORM:
        x = _normed_chunk(x, norm_w_ptr, offs_k, k_mask, rstd)
    return x


@triton.jit
def _decode_gemv_kernel(
    x_ptr,
    ids_ptr,
    residual_ptr,
    norm_w_ptr,
    residual_out_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    partial_max_ptr,
    partial_idx_ptr,
    counter_ptr,
    stride_x,
    stride_w,
    stride_table,
    stride_cb,
    stride_cs,
    stride_ch,
    eps,
    N_OUT,
    K: tl.constexpr,
    NORM: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_k0 = tl.arange(0, BLOCK_K)
    x_row = x_ptr
    if GATHER:
        x_row = x_ptr + tl.load(ids_ptr).to(tl.int64) * stride_x

    # One K step (K <= BLOCK_K): x is read once, for the norm and the product alike.
    ONE_STEP: tl.constexpr = K <= BLOCK_K
    rstd = 1.0
    if NORM and not ONE_STEP:
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < K
            x = _input_chunk(x_row, residual_ptr, norm_w_ptr, offs_k, k_mask, rstd, False, HAS_RESIDUAL)
            sum_sq += x * x
            if GATHER or HAS_RESIDUAL:
                tl.store(residual_out_ptr + offs_k, x.to(residual_out_ptr.dtype.element_ty), mask=k_mask & (pid == 0))
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)

    # Output rows of this program: `rows_a` always, `rows_b` for the paired epilogues.
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs < N_OUT
    HALF: tl.constexpr = HEAD_DIM // 2
    if EPILOGUE == 1:
        rows_a = offs
        rows_b = offs + N_OUT
    elif EPILOGUE == 2:
        head = offs // HALF
        dim = offs % HALF
        rows_a = head * HEAD_DIM + dim
        rows_b = rows_a + HALF
    else:
        rows_a = offs
        rows_b = offs
    PAIRED: tl.constexpr = EPILOGUE == 1 or EPILOGUE == 2
    w_a = w_ptr + rows_a.to(tl.int64)[:, None] * stride_w
    w_b = w_ptr + rows_b.to(tl.int64)[:, None] * stride_w
    acc_a = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if ONE_STEP:
        k_mask = offs_k0 < K
        tile_mask = n_mask[:, None] & k_mask[None, :]
        # The weight loads go first: nothing in them waits for the prologue's arithmetic.
        w_tile_a = tl.load(w_a + offs_k0[None, :], mask=tile_mask, other=0.0)
        if PAIRED:
            w_tile_b = tl.load(w_b + offs_k0[None, :], mask=tile_mask, other=0.0)
        x = _summed_chunk(x_row, residual_ptr, offs_k0, k_mask, HAS_RESIDUAL)
        if NORM:
            if GATHER or HAS_RESIDUAL:
                tl.store(residual_out_ptr + offs_k0, x.to(residual_out_ptr.dtype.element_ty), mask=k_mask & (pid == 0))
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
            x = _normed_chunk(x, norm_w_ptr, offs_k0, k_mask, rstd)
        acc_a = w_tile_a.to(tl.float32) * x[None, :]
        if PAIRED:
            acc_b = w_tile_b.to(tl.float32) * x[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < K
            x = _input_chunk(x_row, residual_ptr, norm_w_ptr, offs_k, k_mask, rstd, NORM, HAS_RESIDUAL)
            tile_mask = n_mask[:, None] & k_mask[None, :]
            acc_a += tl.load(w_a + offs_k[None, :], mask=tile_mask, other=0.0).to(tl.float32) * x[None, :]
            if PAIRED:
                acc_b += tl.load(w_b + offs_k[None, :], mask=tile_mask, other=0.0).to(tl.float32) * x[None, :]
    a = tl.sum(acc_a, axis=1)
    if HAS_BIAS:
        a += tl.load(bias_ptr + rows_a, mask=n_mask, other=0.0).to(tl.float32)
    dtype = w_ptr.dtype.element_ty
    a = a.to(dtype)
    if PAIRED:
        b = tl.sum(acc_b, axis=1)
        if HAS_BIAS:
            b += tl.load(bias_ptr + rows_b, mask=n_mask, other=0.0).to(tl.float32)
        b = b.to(dtype)

    if EPILOGUE == 0:
        tl.store(out_ptr + offs, a, mask=n_mask)
    elif EPILOGUE == 1:
        g = a.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype)
        tl.store(out_ptr + offs, (silu.to(tl.float32) * b.to(tl.float32)).to(dtype), mask=n_mask)
    elif EPILOGUE == 2:
        # Rope as kernels.fused._rotate_heads rounds it, on q and k heads; v passes through.
        pos = tl.load(positions_ptr).to(tl.int64)
        table = pos * stride_table + dim
        cos1 = tl.load(cos_ptr + table, mask=n_mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF, mask=n_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table, mask=n_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF, mask=n_mask, other=0.0).to(tl.float32)
        x1, x2 = a.to(tl.float32), b.to(tl.float32)
        r1 = ((x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        r2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        is_q = head < NUM_Q_HEADS
        is_v = head >= NUM_Q_HEADS + NUM_KV_HEADS
        r1 = tl.where(is_v, a, r1)
        r2 = tl.where(is_v, b, r2)
        tl.store(out_ptr + rows_a, r1, mask=n_mask & is_q)
        tl.store(out_ptr + rows_b, r2, mask=n_mask & is_q)
        slot = tl.load(slot_ptr).to(tl.int64)
        if slot >= 0:  # a padded row of a captured batch writes nothing
            kv_head = tl.where(is_v, head - NUM_Q_HEADS - NUM_KV_HEADS, head - NUM_Q_HEADS)
            dst = (slot // CACHE_BLOCK) * stride_cb + (slot % CACHE_BLOCK) * stride_cs + kv_head * stride_ch + dim
            is_k = n_mask & ~is_q & ~is_v
            tl.store(k_cache_ptr + dst, r1, mask=is_k)
            tl.store(k_cache_ptr + dst + HALF, r2, mask=is_k)
            tl.store(v_cache_ptr + dst, r1, mask=n_mask & is_v)
            tl.store(v_cache_ptr + dst + HALF, r2, mask=n_mask & is_v)
    else:
        # Greedy: this program's (max, first index of it), then the last program to finish
        # reduces every program's pair. Index ties resolve to the lowest index, as torch.argmax.
        logits = tl.where(n_mask, a.to(tl.float32), float("-inf"))
        best = tl.max(logits, axis=0)
        best_idx = tl.min(tl.where(logits == best, offs, N_OUT), axis=0)
        tl.store(partial_max_ptr + pid, best)
        tl.store(partial_idx_ptr + pid, best_idx)
        tl.debug_barrier()  # every thread's stores precede the release below
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            num = tl.num_programs(0)
            run_max = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
            run_idx = tl.full([BLOCK_P], N_OUT, dtype=tl.int32)
            for p0 in range(0, num, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                p_mask = offs_p < num
                m = tl.load(partial_max_ptr + offs_p, mask=p_mask, other=float("-inf"), cache_modifier=".cg")
                i = tl.load(partial_idx_ptr + offs_p, mask=p_mask, other=N_OUT, cache_modifier=".cg")
                better = m > run_max  # earlier chunks hold lower indices: keep them on ties
                run_idx = tl.where(better, i, run_idx)
                run_max = tl.where(better, m, run_max)
            top = tl.max(run_max, axis=0)
            token = tl.min(tl.where(run_max == top, run_idx, N_OUT), axis=0)
            tl.store(out_ptr, token.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (or graph replay)


@dataclass(frozen=True, slots=True)
class GemvTiles:
    block_n: int
    block_k: int
    num_warps: int


def gemv_tiles(k: int, epilogue: int) -> GemvTiles:
    """About 4,096 weights per program and K step over 4 warps (32 per thread, 16-byte loads):
    the K loop is not software-pipelined, so each K step costs a memory round trip, and rows up
    to 2,048 long (every projection input but the 1B shape's down_proj) take one step, reading
    x once for the norm and the product. The paired epilogues read two rows per output. ARGMAX keeps 16 rows over 256 columns: fewer programs,
    so its last program reduces fewer partials."""
    if epilogue == ARGMAX:
        return GemvTiles(16, 256, 4)
    block_k = min(triton.next_power_of_2(k), 2048)
    rows = 2 if epilogue in (SILU_MUL, ROPE_KV) else 1
    return GemvTiles(max(1, 4096 // block_k // rows), block_k, 4)


@dataclass(slots=True)
class GemvPrologue:
    """What the projection's input is: x itself, rmsnorm(x [+ residual]) * norm_weight, or (with
    ids) the embedding rows of `x` for the first layer."""

    norm_weight: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    eps: float = 0.0


@dataclass(slots=True)
class RopeKV:
    """The QKV epilogue's inputs: rope tables [max_positions, D], this token's position [1] and
    KV slot [1], and the layer's 16-bit caches [blocks, block_size, Hkv, D]."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def _check_row(x: torch.Tensor, k: int, what: str) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"{what} {tuple(x.shape)} must be [1, {k}] with a contiguous last dim")


def decode_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: GemvPrologue | None = None,
    epilogue: int = PLAIN,
    rope_kv: RopeKV | None = None,
    argmax_scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tiles: GemvTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token's projection x [1, K] @ weight [N, K]^T with the prologue and epilogue asked for.

    Returns (out, residual): out is [1, N] (PLAIN), [1, N/2] (SILU_MUL), q [1, Hq*D] (ROPE_KV, k
    and v written to the caches) or the argmax token id int64 [1] (ARGMAX); residual is the
    residual stream after the prologue (x + residual, the gathered embedding row, or x) when a
    prologue was given, else None. With `ids`, x is the embedding table [V, K].
    argmax_scratch: (partial max fp32, partial index int32, counter int32 zeroed), sized by
    `argmax_scratch_for` and reused: the kernel leaves the counter at zero again. `tiles`
    overrides `gemv_tiles` (scripts/check_fusion_gpu.py compares choices).
    """
    pro = prologue or GemvPrologue()
    k = weight.shape[1]
    if weight.dim() != 2 or weight.stride(1) != 1 or weight.stride(0) != k:
        raise ValueError(f"weight {tuple(weight.shape)} must be a contiguous [N, K] matrix")
    if pro.ids is not None:
        if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1 or pro.ids.shape != (1,):
            raise ValueError("a gathering prologue needs an embedding table [V, K] and one id")
    else:
        _check_row(x, k, "x")
    if pro.residual is not None:
        if pro.ids is not None:
            raise ValueError("the embedding row starts the residual stream: no residual to add")
        _check_row(pro.residual, k, "residual")
    if (pro.ids is not None or pro.residual is not None) and pro.norm_weight is None:
        raise ValueError("an embedding gather or a residual add only comes with the norm")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype}, the weight {weight.dtype}")
    n = weight.shape[0]
    device = weight.device
    norm = pro.norm_weight is not None
    writes_residual = pro.ids is not None or pro.residual is not None
    residual_out = torch.empty(1, k, dtype=x.dtype, device=device) if writes_residual else None
    if norm and pro.norm_weight.shape != (k,):
        raise ValueError(f"norm weight {tuple(pro.norm_weight.shape)} must be [{k}]")

    dummy = weight
    cache_args = (dummy,) * 6 + (0, 0, 0, 0)
    scratch = (dummy, dummy, dummy)
    heads = (0, 0, 2, 1)
    if epilogue == SILU_MUL:
        if n % 2:
            raise ValueError(f"gate_up has {n} rows: gate and up must be equal halves")
        n_out = n // 2
        out = torch.empty(1, n_out, dtype=x.dtype, device=device)
    elif epilogue == ROPE_KV:
        r = rope_kv
        if r is None:
            raise ValueError("ROPE_KV needs its RopeKV inputs")
        q_size = r.num_q_heads * r.head_dim
        if n != q_size + 2 * r.num_kv_heads * r.head_dim or r.head_dim % 2:
            raise ValueError(f"weight has {n} rows, not q, k and v of {r.num_q_heads}/{r.num_kv_heads} heads")
        if r.k_cache.dtype != x.dtype or r.k_cache.shape != r.v_cache.shape or r.k_cache.stride() != r.v_cache.stride():
            raise ValueError("the caches must be 16-bit like x and laid out alike")
        if r.cos.shape[1] != r.head_dim or r.cos.stride() != r.sin.stride() or r.cos.dtype != x.dtype:
            raise ValueError("rope tables must be [max_positions, head_dim] in x's dtype")
        n_out = n // 2
        out = torch.empty(1, q_size, dtype=x.dtype, device=device)
        cs = r.k_cache.stride()
        cache_args = (r.positions, r.cos, r.sin, r.slot_mapping, r.k_cache, r.v_cache,
                      r.cos.stride(0), cs[0], cs[1], cs[2])
        heads = (r.num_q_heads, r.num_kv_heads, r.head_dim, r.k_cache.shape[1])
    elif epilogue == ARGMAX:
        if argmax_scratch is None:
            raise ValueError("ARGMAX needs its scratch (argmax_scratch_for)")
        n_out = n
        out = torch.empty(1, dtype=torch.int64, device=device)
        scratch = argmax_scratch
    else:
        n_out = n
        out = torch.empty(1, n, dtype=x.dtype, device=device)
    tiles = tiles or gemv_tiles(k, epilogue)
    grid = triton.cdiv(n_out, tiles.block_n)
    if epilogue == ARGMAX and scratch[0].shape[0] < grid:
        raise ValueError(f"argmax scratch holds {scratch[0].shape[0]} partials, the launch makes {grid}")
    _decode_gemv_kernel[(grid,)](
        x, pro.ids if pro.ids is not None else dummy,
        pro.residual if pro.residual is not None else dummy,
        pro.norm_weight if norm else dummy,
        residual_out if residual_out is not None else dummy,
        weight, bias if bias is not None else dummy, out,
        *cache_args[:6], *scratch,
        x.stride(0), weight.stride(0), *cache_args[6:],
        pro.eps, n_out,
        K=k,
        NORM=norm,
        GATHER=pro.ids is not None,
        HAS_RESIDUAL=pro.residual is not None,
        HAS_BIAS=bias is not None,
        EPILOGUE=epilogue,
        NUM_Q_HEADS=heads[0],
        NUM_KV_HEADS=heads[1],
        HEAD_DIM=heads[2],
        CACHE_BLOCK=heads[3],
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        BLOCK_P=4096,
        num_warps=tiles.num_warps,
    )
    if residual_out is None and prologue is not None:
        residual_out = x
    return out, residual_out


def argmax_scratch_for(vocab_size: int, hidden_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ARGMAX epilogue's partials and its counter (zeroed once; the kernel re-zeroes it)."""
    grid = triton.cdiv(vocab_size, gemv_tiles(hidden_size, ARGMAX).block_n)
    return (
        torch.empty(grid, dtype=torch.float32, device=device),
        torch.empty(grid, dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
    )

"""The Triton kernels on a CUDA GPU: the full matrix against the PyTorch references.

Block sizes 8/16/32, head dims 64/128, GQA ratios 1/3/4/8, fp16/bf16/fp32, batches mixing
one-token, block-multiple and ragged contexts, contexts up to 8k (split-K engaged by the
heuristic and forced off on the same inputs), prefill chunks with and without a cached prefix.
Inputs come from `edgepaged.kernels.reference` (NaN in every slot no sequence owns, table padding
pointing at a NaN block); outputs start as NaN, so NaN never passes. The decode step is also
replayed from a CUDA graph, which fails if any launch syncs with the host.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    from edgepaged.attention import AttentionBatch
    from edgepaged.backends.torch_ref import TorchRefBackend
    from edgepaged.backends.triton import TritonBackend
    from edgepaged.kernels import paged_decode_attention, paged_prefill_attention, plan_decode, write_kv
    from edgepaged.kernels.reference import (
        TOLERANCE,
        paged_decode_attention_ref,
        paged_prefill_attention_ref,
        random_paged_kv,
        random_paged_step,
        relative_error,
        write_kv_ref,
    )

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
MATRIX = list(itertools.product([8, 16, 32], [64, 128], [1, 3, 4, 8], DTYPES))
NUM_KV_HEADS = 2


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _id(case) -> str:
    block_size, head_dim, group, dtype = case
    return f"bs{block_size}-d{head_dim}-g{group}-{_dtype_id(dtype)}"


def _nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.isfinite().all(), f"{what}: NaN/inf in the output (unwritten row or leaked poison)"
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e} >= {TOLERANCE[dtype]:.0e}"


def _decode(kv, dtype, group, num_splits, seed, plan_context=0):
    g = torch.Generator().manual_seed(seed)
    num_seqs, num_q_heads, head_dim = kv.context_lens.shape[0], NUM_KV_HEADS * group, kv.k_cache.shape[3]
    q = torch.randn(num_seqs, num_q_heads, head_dim, generator=g).to(dtype).cuda()
    plan_len = max(plan_context, int(kv.context_lens.max()))
    plan = plan_decode(num_seqs, num_q_heads, NUM_KV_HEADS, head_dim, plan_len, "cuda", num_splits=num_splits)
    for scratch in (plan.partial_out, plan.partial_max, plan.partial_sum):
        if scratch is not None:
            scratch.fill_(float("nan"))
    out = _nan_like(q)
    paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5, out=out, plan=plan
    )
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5)
    return out, ref, plan


@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_decode_matrix(case):
    block_size, head_dim, group, dtype = case
    g = torch.Generator().manual_seed(10)
    lens = [1, block_size, 3 * block_size + 5, 777, 2048 + block_size - 1]
    kv = random_paged_kv(lens, block_size, NUM_KV_HEADS, head_dim, dtype, "cuda", g, shared_prefix_blocks=2)
    out, ref, plan = _decode(kv, dtype, group, None, seed=11)
    assert plan.num_splits > 1, "the heuristic should split a 2k context at batch 5"
    _assert_close(out, ref, dtype, f"split-K decode ({plan.num_splits} splits)")
    out, ref, plan = _decode(kv, dtype, group, 1, seed=11)
    assert plan.num_splits == 1
    _assert_close(out, ref, dtype, "single-pass decode")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("lens", [[8192], [8191, 1, 5000, 8192, 64, 3333]], ids=["batch1-8k", "mixed-8k"])
def test_decode_long_contexts(lens, dtype):
    g = torch.Generator().manual_seed(12)
    kv = random_paged_kv(lens, 16, NUM_KV_HEADS, 128, dtype, "cuda", g)
    out, ref, plan = _decode(kv, dtype, 4, None, seed=13)
    assert plan.num_splits > 1
    _assert_close(out, ref, dtype, f"decode with {plan.num_splits} splits")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_decode_with_a_plan_for_the_longest_context(dtype):
    """A captured graph plans for the engine's longest context (32k here); each sequence then cuts
    its own context into splits, from none (a padded row) to all of them."""
    g = torch.Generator().manual_seed(14)
    kv = random_paged_kv([0, 1, 16, 777, 2063, 5000], 16, NUM_KV_HEADS, 64, dtype, "cuda", g)
    out, ref, plan = _decode(kv, dtype, 4, None, seed=15, plan_context=32768)
    assert plan.num_splits > 1
    _assert_close(out, ref, dtype, f"decode planned for 32k ({plan.num_splits} splits)")


def _prefill(kv, query_lens, dtype, group, seed):
    g = torch.Generator().manual_seed(seed)
    head_dim = kv.k_cache.shape[3]
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).cuda()
    q = torch.randn(sum(query_lens), NUM_KV_HEADS * group, head_dim, generator=g).to(dtype).cuda()
    out = _nan_like(q)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.context_lens, head_dim**-0.5)
    paged_prefill_attention(*args, out=out, max_query_len=max(query_lens))
    return out, paged_prefill_attention_ref(*args)


@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_prefill_matrix(case):
    block_size, head_dim, group, dtype = case
    g = torch.Generator().manual_seed(20)
    # whole prompt, chunk after a cached prefix, one-token chunk, ragged chunk after a shared prefix
    lens = [3 * block_size + 3, 300, 1000, 700]
    query_lens = [3 * block_size + 3, 64, 1, 333]
    kv = random_paged_kv(lens, block_size, NUM_KV_HEADS, head_dim, dtype, "cuda", g, shared_prefix_blocks=2)
    out, ref = _prefill(kv, query_lens, dtype, group, seed=21)
    _assert_close(out, ref, dtype, "prefill")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_prefill_long_chunk_after_long_prefix(dtype):
    g = torch.Generator().manual_seed(22)
    kv = random_paged_kv([8192, 2500], 16, NUM_KV_HEADS, 128, dtype, "cuda", g)
    out, ref = _prefill(kv, [2048, 2500], dtype, 4, seed=23)
    _assert_close(out, ref, dtype, "long prefill")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_write_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(30)
    num_tokens, head_dim = 300, 128
    slots = torch.randperm(64 * 16, generator=g)[:num_tokens]
    slots[::7] = -1
    fused = torch.randn(num_tokens, 3 * NUM_KV_HEADS, head_dim, generator=g).to(dtype).cuda()
    key, value = fused[:, :NUM_KV_HEADS], fused[:, NUM_KV_HEADS : 2 * NUM_KV_HEADS]  # strided views
    caches = [torch.full((64, 16, NUM_KV_HEADS, head_dim), float("nan"), dtype=dtype, device="cuda") for _ in range(4)]
    write_kv(key, value, caches[0], caches[1], slots.cuda())
    write_kv_ref(key, value, caches[2], caches[3], slots.cuda())
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def _batch(step, block_size: int) -> AttentionBatch:
    nd, kv = step.num_decode_tokens, step.kv
    return AttentionBatch(
        slot_mapping=step.slot_mapping,
        num_decode_tokens=nd,
        decode_block_tables=kv.block_tables[:nd],
        decode_context_lens=kv.context_lens[:nd],
        max_decode_context_len=int(kv.context_lens[:nd].max()) if nd else 0,
        prefill_block_tables=kv.block_tables[nd:],
        prefill_query_start_loc=step.query_start_loc,
        prefill_context_lens=kv.context_lens[nd:],
        max_prefill_query_len=step.max_query_len,
        max_prefill_context_len=int(kv.context_lens[nd:].max()) if kv.context_lens.shape[0] > nd else 0,
        block_size=block_size,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_triton_backend_matches_torch_backend_on_mixed_step(dtype):
    g = torch.Generator().manual_seed(40)
    block_size, group, head_dim = 16, 3, 64
    num_q_heads = NUM_KV_HEADS * group
    step = random_paged_step(
        [1, 700, 4097, 16],
        [100, 1500, 2048],
        [100, 37, 512],
        block_size,
        num_q_heads,
        NUM_KV_HEADS,
        head_dim,
        dtype,
        "cuda",
        g,
    )
    batch, scale = _batch(step, block_size), head_dim**-0.5
    triton_backend = TritonBackend(num_q_heads, NUM_KV_HEADS, head_dim, scale)
    torch_backend = TorchRefBackend(num_q_heads, NUM_KV_HEADS, head_dim, scale)
    k_cache, v_cache = step.kv.k_cache.clone(), step.kv.v_cache.clone()
    out = triton_backend.forward(step.q, step.k, step.v, k_cache, v_cache, triton_backend.prepare(batch))
    # The torch backend reads padded slots before masking, so it gets the finite cache the runner keeps.
    k_ref, v_ref = step.kv.k_cache.nan_to_num(0.0), step.kv.v_cache.nan_to_num(0.0)
    expected = torch_backend.forward(step.q, step.k, step.v, k_ref, v_ref, torch_backend.prepare(batch))
    assert out.isfinite().all()
    err = relative_error(out, expected)
    assert err < 2 * TOLERANCE[dtype], f"triton vs torch backend: {err:.2e}"
    written = step.slot_mapping
    assert torch.equal(k_cache.view(-1, NUM_KV_HEADS, head_dim)[written], step.k)
    assert torch.equal(v_cache.view(-1, NUM_KV_HEADS, head_dim)[written], step.v)


def test_backend_decode_step_replays_from_cuda_graph():
    """Capture one decode step with a plan sized for 4k, then replay it for new, shorter contexts
    written into the captured tensors: the plan's scratch and split count stay valid."""
    dtype, block_size, group, head_dim = torch.bfloat16, 16, 4, 128
    num_q_heads, scale = NUM_KV_HEADS * group, head_dim**-0.5
    backend = TritonBackend(num_q_heads, NUM_KV_HEADS, head_dim, scale)
    g = torch.Generator().manual_seed(50)
    first = random_paged_step(
        [4096, 3000, 17], [], [], block_size, num_q_heads, NUM_KV_HEADS, head_dim, dtype, "cuda", g
    )
    batch = _batch(first, block_size)
    k_cache, v_cache = first.kv.k_cache.clone(), first.kv.v_cache.clone()
    q, k, v = first.q.clone(), first.k.clone(), first.v.clone()
    prepared = backend.prepare(batch)
    assert prepared.decode_plan.num_splits > 1
    backend.forward(q, k, v, k_cache, v_cache, prepared)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, k_cache, v_cache, prepared)

    second = random_paged_step(
        [2000, 1, 333], [], [], block_size, num_q_heads, NUM_KV_HEADS, head_dim, dtype, "cuda", g
    )
    width = second.kv.block_tables.shape[1]
    assert second.kv.k_cache.shape[0] <= k_cache.shape[0] and width <= batch.decode_block_tables.shape[1]
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    k_cache[: second.kv.k_cache.shape[0]] = second.kv.k_cache
    v_cache[: second.kv.v_cache.shape[0]] = second.kv.v_cache
    batch.decode_block_tables.zero_()
    batch.decode_block_tables[:, :width] = second.kv.block_tables
    batch.decode_context_lens.copy_(second.kv.context_lens)
    batch.slot_mapping.copy_(second.slot_mapping)
    for dst, src in ((q, second.q), (k, second.k), (v, second.v)):
        dst.copy_(src)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()

    ref = paged_decode_attention_ref(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, scale)
    _assert_close(out, ref, dtype, "decode replayed from a CUDA graph")

"""The W4A16 / W8A16 Triton kernels on a CUDA GPU, at the shapes of a 1B model, against the
dequantize-then-F.linear float32 references (tests/test_quant_kernels.py runs the small shapes
interpreted on a CPU; the checks themselves live there).

K=2048 with N = 2048 (o_proj), 3072 (fused qkv, with bias as in Qwen2), 16384 (fused gate_up)
and 128256 (Llama 3 lm_head), plus the down projection (K=8192, N=2048); T = 1, 4, 16 (the two
decode kernel shapes, split-K chosen by the SM-count rule), 128 and 1024 (the GEMM); fp16 and
bf16; int4 with groups 32 (GGUF Q4_0/Q4_1 blocks) and 128 (AWQ/GPTQ), int8 with group 32 (Q8_0
blocks). Other group sizes, forced split-K and fp32 activations run on the qkv shape. Outputs and scratch start as
NaN, so NaN never passes. The decode launches are also replayed from a CUDA graph, which fails
if either wrapper syncs with the host.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from test_quant_kernels import TOLERANCE, activations, assert_matches_reference, check_launch, quantized_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (name, K, N, bias)
SHAPES = [
    ("o", 2048, 2048, False),
    ("qkv", 2048, 3072, True),
    ("gate_up", 2048, 16384, False),
    ("lm_head", 2048, 128256, False),
    ("down", 8192, 2048, False),
]
TOKENS = [1, 4, 16, 128, 1024]
FORMATS = [(4, 32), (4, 128), (8, 32)]  # (bits, group)
DTYPES = ["bfloat16", "float16"]
MATRIX = list(itertools.product(SHAPES, TOKENS, FORMATS, DTYPES))
# Every other group size, and split-K forced on, on the qkv shape.
EXTRA = [
    (bits, group, tokens, split_k)
    for (bits, group), tokens, split_k in itertools.product(
        [(4, 64), (8, 16), (8, 128)], [1, 4, 16, 128], [None]
    )
] + [(4, 128, 1, 8), (4, 32, 7, 3), (8, 32, 1, 16), (8, 128, 16, 2)]


@functools.lru_cache(maxsize=4)
def _weight(bits, k, n, group):
    return quantized_weight(bits, k, n, group, device="cuda")


def _matrix_id(case) -> str:
    (name, _, _, _), tokens, (bits, group), dtype = case
    return f"{name}-t{tokens}-w{bits}g{group}-{dtype}"


@pytest.mark.parametrize("case", sorted(MATRIX, key=lambda c: (c[0], c[2])), ids=_matrix_id)
def test_1b_shapes_match_reference(case):
    (_, k, n, bias), tokens, (bits, group), dtype = case
    x, b = activations(dtype, tokens, k, n, bias, device="cuda")
    r = check_launch(x, _weight(bits, k, n, group), bits, group, b)
    assert_matches_reference(r)


@pytest.mark.parametrize("case", EXTRA, ids=lambda c: f"w{c[0]}g{c[1]}-t{c[2]}-split{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_groups_and_forced_splits(case, dtype):
    bits, group, tokens, split_k = case
    x, b = activations(dtype, tokens, 2048, 3072, True, device="cuda")
    assert_matches_reference(check_launch(x, _weight(bits, 2048, 3072, group), bits, group, b, split_k))


@pytest.mark.parametrize("tokens", [1, 4, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_fp32_activations(bits, tokens):
    """fp32 x (a model run in fp32 on a GPU for parity): exact fp32 dots, smaller tiles."""
    x, b = activations("float32", tokens, 2048, 3072, True, device="cuda")
    assert_matches_reference(check_launch(x, _weight(bits, 2048, 3072, 32), bits, 32, b))


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_replays_from_a_cuda_graph(bits, tokens):
    """Captured once, replayed on new inputs: the split-K scratch comes from the graph's pool and
    nothing reads a device value on the host."""
    from edgepaged.kernels import w4a16_linear, w8a16_linear
    from edgepaged.kernels.quant_reference import w4a16_linear_ref, w8a16_linear_ref
    from edgepaged.kernels.reference import relative_error

    group, k, n = 32, 2048, 2048
    packed = _weight(bits, k, n, group)
    kernel, ref = (w4a16_linear, w4a16_linear_ref) if bits == 4 else (w8a16_linear, w8a16_linear_ref)
    x, b = activations("bfloat16", tokens, k, n, True, device="cuda")
    static_x = x.clone()
    kernel(static_x, *packed, group, b)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernel(static_x, *packed, group, b)
    for seed in (5, 6):
        fresh, _ = activations("bfloat16", tokens, k, n, False, device="cuda", seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(static_out, ref(fresh, *packed, group, b)) < TOLERANCE

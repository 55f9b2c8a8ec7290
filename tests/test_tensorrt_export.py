"""The exported ONNX graph, executed in onnxruntime with our reference attention, against the torch backend.

Steps run on real, non-contiguous block tables with garbage in every slot nobody owns: a prefill
of two prompts, then a mixed step (a decode, a chunk continuing a cached prefix, a new prompt),
then decodes. Both graph forms run: the exported one and the one lowered for TensorRT's plugins.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from conftest import make_engine

from edgepaged import ModelLoadError, SamplingParams
from edgepaged.attention import AttentionBatch
from edgepaged.backends.tensorrt.export import (
    ATTENTION_OP,
    DOMAIN,
    GRAPH_VERSION,
    OPSET,
    export_onnx,
    k_cache_input,
    step_inputs,
    v_cache_input,
)
from edgepaged.backends.tensorrt.ort_reference import OrtModel
from edgepaged.backends.tensorrt.plugin import ATTEND_OP, WRITE_KV_OP, lower_for_tensorrt
from edgepaged.backends.tensorrt.runtime import StepPlanner
from edgepaged.backends.torch_ref import TorchRefBackend
from edgepaged.models.config import ModelConfig
from edgepaged.models.llama import LlamaForCausalLM
from edgepaged.models.random_init import write_random_model
from edgepaged.models.weights import load_weights

BLOCK_SIZE = 4
NUM_BLOCKS = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # Three query heads per KV head and a bias on qkv (qwen2-style) exercise GQA and the Gemm bias.
    return write_random_model(
        tmp_path_factory.mktemp("trt-export"), "tiny-llama", vocab_size=300,
        num_attention_heads=6, num_key_value_heads=2, hidden_size=96, attention_bias=True,
    )


@pytest.fixture(scope="module")
def torch_model(folder) -> LlamaForCausalLM:
    cfg = ModelConfig.from_folder(folder)
    backend = TorchRefBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    model = LlamaForCausalLM(cfg, backend, torch.float32, torch.device("cpu"), max_positions=128)
    load_weights(model, folder)
    return model


@pytest.fixture(scope="module")
def onnx_path(torch_model, tmp_path_factory) -> Path:
    return export_onnx(torch_model, tmp_path_factory.mktemp("onnx") / "decoder.onnx", BLOCK_SIZE)


def test_exported_graph_passes_the_checker_with_one_attention_node_per_layer(onnx_path, torch_model):
    onnx.checker.check_model(str(onnx_path), full_check=True)
    proto = onnx.load(str(onnx_path))
    assert {o.domain: o.version for o in proto.opset_import}[""] >= OPSET >= 17
    attention = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in attention] == [ATTENTION_OP] * torch_model.config.num_layers
    for layer, node in enumerate(attention):
        assert list(node.input[3:]) == [
            k_cache_input(layer), v_cache_input(layer), "block_tables", "context_lens", "slot_mapping", "query_start_loc"
        ]
    assert {p.key: p.value for p in proto.metadata_props}["graph_version"] == str(GRAPH_VERSION)
    # The layers' weights live in the external data file; the embedding stays with torch.
    data = onnx_path.with_name(onnx_path.name + ".data")
    layer_bytes = sum(p.numel() * 4 for p in [*torch_model.layers.parameters(), *torch_model.norm.parameters()])
    assert data.stat().st_size >= layer_bytes > onnx_path.stat().st_size
    assert all(list(t.dims) != list(torch_model.embed_tokens.shape) for t in proto.graph.initializer)


def test_lowering_splits_each_attention_node_into_the_two_plugin_nodes(onnx_path, torch_model):
    lowered = lower_for_tensorrt(onnx.load(str(onnx_path)))
    onnx.checker.check_model(lowered, full_check=True)
    custom = [n for n in lowered.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in custom] == [WRITE_KV_OP, ATTEND_OP] * torch_model.config.num_layers
    write, attend = custom[:2]
    assert list(attend.input[1:3]) == list(write.output)  # attention reads the pools the write produced
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == DOMAIN.encode() and attrs["aot"] == 1


@dataclass
class _Seq:
    tokens: list[int]
    table: list[int]  # physical blocks, deliberately out of order
    computed: int = 0


def _batch(chunks: list[tuple[_Seq, int]]) -> tuple[AttentionBatch, torch.Tensor, torch.Tensor, list[int]]:
    """The runner's layout for chunks (sequence, tokens): decodes first; also ids, positions, sampled rows."""
    chunks = [c for c in chunks if c[1] == 1] + [c for c in chunks if c[1] > 1]
    ids, positions, slots, rows = [], [], [], []
    dec_tables, dec_lens, pre_tables, pre_lens, starts = [], [], [], [], [0]
    for seq, n in chunks:
        span = range(seq.computed, seq.computed + n)
        ids += seq.tokens[span.start : span.stop]
        positions += list(span)
        slots += [seq.table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in span]
        rows.append(len(ids) - 1)
        if n == 1:
            dec_tables.append(seq.table)
            dec_lens.append(span.stop)
        else:
            pre_tables.append(seq.table)
            pre_lens.append(span.stop)
            starts.append(starts[-1] + n)
        seq.computed = span.stop

    def tables(ts):
        width = max((len(t) for t in ts), default=0)
        return torch.tensor([t + [0] * (width - len(t)) for t in ts], dtype=torch.int32).view(len(ts), width)

    nd = len(dec_lens)
    batch = AttentionBatch(
        slot_mapping=torch.tensor(slots), num_decode_tokens=nd,
        decode_block_tables=tables(dec_tables), decode_context_lens=torch.tensor(dec_lens, dtype=torch.int32),
        max_decode_context_len=max(dec_lens, default=0),
        prefill_block_tables=tables(pre_tables), prefill_query_start_loc=torch.tensor(starts, dtype=torch.int32),
        prefill_context_lens=torch.tensor(pre_lens, dtype=torch.int32),
        max_prefill_query_len=max((b - a for a, b in zip(starts, starts[1:])), default=0),
        max_prefill_context_len=max(pre_lens, default=0), block_size=BLOCK_SIZE,
    )
    return batch, torch.tensor(ids), torch.tensor(positions), rows


def test_step_inputs_put_every_sequence_in_one_table_decodes_first():
    a, b, c = _Seq([1] * 9, [7, 2, 11]), _Seq([2] * 12, [5, 9, 1]), _Seq([3] * 3, [4])
    a.computed, b.computed = 8, 5
    batch, *_ = _batch([(b, 6), (a, 1), (c, 3)])
    step = step_inputs(batch)
    assert step.block_tables.tolist() == [[7, 2, 11], [5, 9, 1], [4, 0, 0]]
    assert step.context_lens.tolist() == [9, 11, 3]
    assert step.query_start_loc.tolist() == [0, 1, 7, 10]
    assert step.slot_mapping.tolist() == batch.slot_mapping.tolist()
    assert not step.decode_only
    decode, *_ = _batch([(a, 1)])
    assert step_inputs(decode).decode_only and step_inputs(decode).query_start_loc.tolist() == [0, 1]


@pytest.mark.parametrize("lowered", [False, True], ids=["exported", "lowered"])
def test_ort_matches_the_torch_backend_on_prefill_chunked_and_decode_steps(onnx_path, torch_model, lowered):
    cfg = torch_model.config
    graph = onnx.load(str(onnx_path))
    ort_model = OrtModel(lower_for_tensorrt(graph) if lowered else graph, cfg, torch_model.embed_tokens.data, None)
    planner, backend = StepPlanner(), torch_model.layers[0].self_attn.backend
    gen = torch.Generator().manual_seed(0)
    garbage = 50 * torch.randn(cfg.num_layers, 2, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    pools = {"torch": garbage.clone(), "ort": garbage.clone()}
    caches = {k: [(p[i, 0], p[i, 1]) for i in range(cfg.num_layers)] for k, p in pools.items()}
    tokens = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
    a, b, c = _Seq(tokens(13), [17, 3, 9, 21]), _Seq(tokens(16), [8, 14, 5, 11]), _Seq(tokens(7), [2, 19])
    steps = [[(a, 11), (b, 6)], [(a, 1), (b, 7), (c, 5)], [(a, 1), (b, 1), (c, 1)], [(b, 1), (c, 1)]]
    with torch.inference_mode():
        for chunks in steps:
            batch, ids, positions, rows = _batch(chunks)
            expected = torch_model.compute_logits(torch_model(ids, positions, caches["torch"], backend.prepare(batch))[rows])
            got = ort_model.compute_logits(ort_model(ids, positions, caches["ort"], planner.prepare(batch))[rows])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(pools["ort"], pools["torch"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(pools["ort"], garbage)  # the pools really were written


def test_ort_decoder_in_the_engine_generates_the_torch_backend_tokens(folder, onnx_path):
    """StepPlanner + OrtModel swapped into a real LLMEngine: the drop-in the TensorRT model uses."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    shared = list(range(40, 49))  # two full blocks plus a token, shared by p0 and p1
    prompts = {"p0": shared + [7, 8, 9], "p1": shared + [10], "p2": [200, 3, 77, 5, 6]}
    results = []
    for swap in (False, True):
        engine = make_engine(folder, num_kv_blocks=32, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
        if swap:
            cfg = engine.model.config
            model = OrtModel(onnx_path, cfg, engine.model.embed_tokens.data, None)
            engine.runner.model = engine.model = model
            engine.runner.backend = StepPlanner()
        final = {}
        for wave in (["p0"], ["p1", "p2"]):  # p1 arrives once p0's prefix blocks are cached
            for rid in wave:
                engine.add_request(rid, prompts[rid], params)
            final.update(engine.run_to_completion(wave))
        results.append({rid: out.outputs[0].token_ids for rid, out in final.items()})
        assert engine.stats().prefix_hit_tokens > 0
    assert results[0] == results[1]


def _loaded(folder: Path, keep_quantized: bool = False) -> LlamaForCausalLM:
    cfg = ModelConfig.from_folder(folder)
    backend = TorchRefBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    model = LlamaForCausalLM(cfg, backend, torch.float32, torch.device("cpu"), max_positions=64)
    load_weights(model, folder, keep_quantized=keep_quantized)
    return model


@pytest.mark.parametrize("shape,feature", [
    ("tiny-qwen3", r"q/k RMSNorm"),
    ("tiny-phi4mini", r"partial rotary \(rope on 24 of 32 head dims, partial_rotary_factor 0.75\)"),
])
def test_export_refuses_what_the_graph_cannot_represent(tmp_path, shape, feature):
    folder = write_random_model(tmp_path / shape, shape, vocab_size=64)
    with pytest.raises(ModelLoadError, match=rf"cannot represent {shape} \(\w+\): {feature}"):
        export_onnx(_loaded(folder), tmp_path / "out" / "decoder.onnx", BLOCK_SIZE, shape)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_export_refuses_packed_weights(tmp_path):
    from gguf_models import RECIPES, write_gguf_model

    folder = write_gguf_model(tmp_path / "q4", RECIPES["q4_0"])
    with pytest.raises(ModelLoadError, match=r"cannot represent the model \(llama\): quantized linear layers"):
        export_onnx(_loaded(folder, keep_quantized=True), tmp_path / "out" / "decoder.onnx", BLOCK_SIZE)
    export_onnx(_loaded(folder), tmp_path / "dense" / "decoder.onnx", BLOCK_SIZE)  # dequantized: float weights export


def test_a_build_is_refused_before_any_work(tmp_path, monkeypatch):
    """Before TensorRT is imported, let alone the weights fingerprinted or exported."""
    from edgepaged.backends.tensorrt import build as trt_build

    folder = write_random_model(tmp_path / "tiny-qwen3", "tiny-qwen3", vocab_size=64)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_build, "model_fingerprint", lambda *a: pytest.fail("fingerprinted a refused model"))
    with pytest.raises(ModelLoadError, match=r"cannot represent tiny-qwen3 \(qwen3\): q/k RMSNorm"):
        trt_build.build_engine(folder, "rtx-4090-24gb", cache_dir=tmp_path / "engines")

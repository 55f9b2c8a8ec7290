"""Our Llama-family decoder as an ONNX graph, with paged attention as one custom node per layer.

The graph is the decoder stack: hidden states in, the final norm's output out. The token
embedding and the LM head stay in torch, so a model with tied embeddings keeps one copy of its
largest matrix (a lookup and one GEMM per step cost nothing next to the layers). Every layer's
attention is a node `edgepaged::paged_attention` whose inputs are the layer's new q, k and v, its
K and V pools, and the step's metadata (block table, context lengths, slot mapping, query start
locations); it writes k/v into the pools and attends, and its pool outputs are the updated pools.
Decode steps are chunks of one query, so one op covers prefill chunks and decodes alike; that is
the kernel contract of `paged_prefill_attention` with every sequence of the step in one table.

The graph mirrors `models/llama.py` op for op (fused qkv and gate/up projections, RMSNorm in
fp32, rope in the model dtype), and it is built from an already loaded `LlamaForCausalLM`, so
the weights it carries are exactly the ones the torch backends run. Weights go to one external
data file next to the graph, which keeps models above protobuf's 2 GB limit exportable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from ...attention import AttentionBatch
from ...errors import ModelLoadError
from ...models.config import ModelConfig
from ...models.llama import LlamaForCausalLM, RMSNorm

# Bump when the graph's inputs, outputs or op semantics change: cached engines are keyed on it.
GRAPH_VERSION = 1
OPSET = 17
DOMAIN = "edgepaged"
ATTENTION_OP = "paged_attention"

HIDDEN_IN = "hidden_states"  # [tokens, hidden], model dtype: the token embeddings of the step
POSITIONS = "positions"  # int64 [tokens]
SLOT_MAPPING = "slot_mapping"  # int64 [tokens]
BLOCK_TABLES = "block_tables"  # int32 [seqs, blocks_per_seq]
CONTEXT_LENS = "context_lens"  # int32 [seqs]
QUERY_START_LOC = "query_start_loc"  # int32 [seqs + 1]
HIDDEN_OUT = "hidden"  # [tokens, hidden], model dtype: after the final norm
STEP_INPUTS = (HIDDEN_IN, POSITIONS, SLOT_MAPPING, BLOCK_TABLES, CONTEXT_LENS, QUERY_START_LOC)

ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
_INITIALIZER_DTYPES = {**ONNX_DTYPES, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32}


def k_cache_input(layer: int) -> str:
    return f"k_cache.{layer}"


def v_cache_input(layer: int) -> str:
    return f"v_cache.{layer}"


def k_cache_output(layer: int) -> str:
    return f"k_cache_out.{layer}"


def v_cache_output(layer: int) -> str:
    return f"v_cache_out.{layer}"


@dataclass(slots=True)
class StepInputs:
    """One scheduler step in the graph's layout: every sequence in one table, decodes first.

    Decode sequence i owns query row i; prefill chunk j owns the rows after the decodes given by
    the prefill start locations, so `query_start_loc` covers all rows of the step.
    """

    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [S, W]
    context_lens: torch.Tensor  # int32 [S]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    decode_only: bool


def step_inputs(batch: AttentionBatch) -> StepInputs:
    """Merge the batch's decode and prefill descriptions into one; stays on the device, no sync."""
    nd = batch.num_decode_tokens
    device = batch.slot_mapping.device
    width = max(batch.decode_block_tables.shape[1], batch.prefill_block_tables.shape[1], 1)
    tables = [t for t in (batch.decode_block_tables, batch.prefill_block_tables) if t.shape[0]]
    block_tables = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tables]).to(torch.int32)
    decode_starts = torch.arange(nd + 1, dtype=torch.int32, device=device)
    prefill_starts = batch.prefill_query_start_loc[1:].to(torch.int32) + nd
    return StepInputs(
        slot_mapping=batch.slot_mapping.to(torch.int64),
        block_tables=block_tables.contiguous(),
        context_lens=torch.cat([batch.decode_context_lens, batch.prefill_context_lens]).to(torch.int32),
        query_start_loc=torch.cat([decode_starts, prefill_starts]),
        decode_only=batch.num_prefills == 0,
    )


def check_exportable(cfg: ModelConfig, model_name: str, quantized: bool) -> None:
    """Refuse, before any work, a model the graph below would export wrong: it has no q/k norm
    (Qwen3), rotates every dim of each head (Phi-4-mini rotates only `rotary_dim`), and holds
    float weights only (`quantized`: the weights to export are packed), so any of these would
    give an engine computing another model, or none at all."""
    unsupported = []
    if cfg.qk_norm:
        unsupported.append("q/k RMSNorm (Qwen3's q_norm/k_norm)")
    if cfg.rotary_dim != cfg.head_dim:
        unsupported.append(f"partial rotary (rope on {cfg.rotary_dim} of {cfg.head_dim} head dims, "
                           f"partial_rotary_factor {cfg.partial_rotary_factor})")
    if quantized:
        unsupported.append("quantized linear layers (the graph holds float weights: load the model with "
                           "keep_quantized=False to export them dequantized)")
    if unsupported:
        raise ModelLoadError(
            f"the TensorRT export cannot represent {model_name} ({cfg.architecture}): {'; '.join(unsupported)}. "
            "Serve it with the torch or triton backend."
        )


class _Graph:
    """Appends nodes and initializers with unique names; knows the model dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.onnx_dtype = ONNX_DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], num_outputs: int = 1, **attrs) -> list[str]:
        outputs = [self.name(op_type.lower()) for _ in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), **attrs))
        return outputs

    def op1(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.op(op_type, list(inputs), **attrs)[0]

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        t = tensor.detach().to("cpu").contiguous()
        proto = TensorProto(name=name, data_type=_INITIALIZER_DTYPES[t.dtype], dims=list(t.shape))
        proto.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        self.initializers.append(proto)
        return name

    def ints(self, values: list[int]) -> str:
        return self.weight(self.name("shape"), torch.tensor(values, dtype=torch.int64))

    def linear(self, x: str, prefix: str, module) -> str:
        inputs = [x, self.weight(f"{prefix}.weight", module.weight)]
        if module.bias is not None:
            inputs.append(self.weight(f"{prefix}.bias", module.bias))
        return self.op1("Gemm", *inputs, transB=1)

    def rms_norm(self, x: str, prefix: str, norm: RMSNorm) -> str:
        """fp32 normalisation, cast back, then the weight: the order `RMSNorm.forward` uses."""
        xf = self.op1("Cast", x, to=TensorProto.FLOAT)
        mean_sq = self.op1("ReduceMean", self.op1("Mul", xf, xf), axes=[-1], keepdims=1)
        eps = self.weight(f"{prefix}.eps", torch.tensor([norm.eps], dtype=torch.float32))
        normed = self.op1("Div", xf, self.op1("Sqrt", self.op1("Add", mean_sq, eps)))
        return self.op1("Mul", self.weight(f"{prefix}.weight", norm.weight), self.op1("Cast", normed, to=self.onnx_dtype))

    def rope(self, x: str, cos: str, sin: str, half: int) -> str:
        first, second = self.op("Split", [x, self.ints([half, half])], num_outputs=2, axis=2)
        rotated = self.op1("Concat", self.op1("Neg", second), first, axis=2)
        return self.op1("Add", self.op1("Mul", x, cos), self.op1("Mul", rotated, sin))


def build_graph(model: LlamaForCausalLM, block_size: int, model_name: str = "the model") -> onnx.ModelProto:
    """The decoder of `model` as an in-memory ONNX model (weights as initializers)."""
    cfg = model.config
    packed = any(not isinstance(m.weight, torch.Tensor) for m in model.modules() if hasattr(m, "weight"))
    check_exportable(cfg, model_name, packed)
    g = _Graph(model.embed_tokens.dtype)
    hq, hkv, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_size, kv_size = hq * dim, hkv * dim
    scale = model.layers[0].self_attn.backend.scale

    cos_table = g.weight("rope.cos", model.rope_cos)
    sin_table = g.weight("rope.sin", model.rope_sin)
    axis1 = g.ints([1])
    cos = g.op1("Unsqueeze", g.op1("Gather", cos_table, POSITIONS, axis=0), axis1)
    sin = g.op1("Unsqueeze", g.op1("Gather", sin_table, POSITIONS, axis=0), axis1)
    q_shape, kv_shape, flat_shape = g.ints([-1, hq, dim]), g.ints([-1, hkv, dim]), g.ints([-1, q_size])
    qkv_split = g.ints([q_size, kv_size, kv_size])
    mlp_split = g.ints([cfg.intermediate_size, cfg.intermediate_size])

    x = HIDDEN_IN
    attention_outputs = []  # typed for shape inference: nothing else knows the custom op's outputs
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        h = g.rms_norm(x, f"{p}.input_layernorm", layer.input_layernorm)
        q, k, v = g.op("Split", [g.linear(h, f"{p}.qkv_proj", attn.qkv_proj), qkv_split], num_outputs=3, axis=1)
        q = g.rope(g.op1("Reshape", q, q_shape), cos, sin, dim // 2)
        k = g.rope(g.op1("Reshape", k, kv_shape), cos, sin, dim // 2)
        v = g.op1("Reshape", v, kv_shape)
        out = g.name("attention")
        attention_outputs.append(helper.make_tensor_value_info(out, g.onnx_dtype, ["tokens", hq, dim]))
        g.nodes.append(
            helper.make_node(
                ATTENTION_OP,
                [q, k, v, k_cache_input(i), v_cache_input(i), BLOCK_TABLES, CONTEXT_LENS, SLOT_MAPPING, QUERY_START_LOC],
                [out, k_cache_output(i), v_cache_output(i)],
                name=f"{p}.paged_attention",
                domain=DOMAIN,
                scale=float(scale),
            )
        )
        x = g.op1("Add", x, g.linear(g.op1("Reshape", out, flat_shape), f"{p}.o_proj", attn.o_proj))
        h = g.rms_norm(x, f"{p}.post_attention_layernorm", layer.post_attention_layernorm)
        gate, up = g.op("Split", [g.linear(h, f"{p}.gate_up_proj", layer.mlp.gate_up_proj), mlp_split], num_outputs=2, axis=1)
        act = g.op1("Mul", g.op1("Mul", gate, g.op1("Sigmoid", gate)), up)
        x = g.op1("Add", x, g.linear(act, f"{p}.down_proj", layer.mlp.down_proj))
    g.nodes.append(helper.make_node("Identity", [g.rms_norm(x, "norm", model.norm)], [HIDDEN_OUT], name="output"))

    pool = ["num_blocks", block_size, hkv, dim]
    inputs = [
        helper.make_tensor_value_info(HIDDEN_IN, g.onnx_dtype, ["tokens", cfg.hidden_size]),
        helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["tokens"]),
        helper.make_tensor_value_info(SLOT_MAPPING, TensorProto.INT64, ["tokens"]),
        helper.make_tensor_value_info(BLOCK_TABLES, TensorProto.INT32, ["seqs", "blocks_per_seq"]),
        helper.make_tensor_value_info(CONTEXT_LENS, TensorProto.INT32, ["seqs"]),
        helper.make_tensor_value_info(QUERY_START_LOC, TensorProto.INT32, ["seqs_plus_1"]),
    ]
    outputs = [helper.make_tensor_value_info(HIDDEN_OUT, g.onnx_dtype, ["tokens", cfg.hidden_size])]
    for i in range(cfg.num_layers):
        inputs += [helper.make_tensor_value_info(n(i), g.onnx_dtype, pool) for n in (k_cache_input, v_cache_input)]
        outputs += [helper.make_tensor_value_info(n(i), g.onnx_dtype, pool) for n in (k_cache_output, v_cache_output)]
    graph = helper.make_graph(g.nodes, "edgepaged_decoder", inputs, outputs, initializer=g.initializers,
                              value_info=attention_outputs)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        producer_name="edgepaged",
    )
    meta = {"graph_version": GRAPH_VERSION, "block_size": block_size, "dtype": str(g.dtype).removeprefix("torch.")}
    helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    return proto


def save_with_external_data(proto: onnx.ModelProto, path: Path) -> Path:
    """Write `path` plus `<name>.data` beside it holding the weights (no 2 GB limit); shape
    constants stay inline, where shape inference and parsers read them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=f"{path.name}.data", size_threshold=1024,
    )
    return path


def export_onnx(model: LlamaForCausalLM, path: Path, block_size: int, model_name: str = "the model") -> Path:
    """Export `model`'s decoder to `path` (+ its external data file); returns the path."""
    return save_with_external_data(build_graph(model, block_size, model_name), path)

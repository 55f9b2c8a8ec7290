"""Execute an exported graph in onnxruntime on CPU, its custom ops implemented by our references.

This is how the export is verified where no TensorRT engine can run: onnxruntime executes every
standard node of the graph itself, and the `edgepaged` nodes call the PyTorch references in
`edgepaged.kernels.reference` (the same references the Triton kernels are tested against)
through onnxruntime-extensions' Python custom ops. Both forms of the graph run: the exported one
(`paged_attention`, write then attend) and the one lowered for TensorRT (`write_kv` followed by
`paged_attend`, one node per plugin kernel).

onnxruntime-extensions serves Python ops only in its own domain, so the session gets a copy of
the graph with the `edgepaged` domain renamed; nothing else about the graph changes. Custom op
outputs are new arrays (onnxruntime has no aliasing), so the updated pools come back as outputs
and are copied into the caller's pools, which is what the TensorRT engine does in place.
Float32 graphs only: the references' tolerance is fp32's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime_extensions import PyCustomOpDef, default_opset_domain, get_library_path, onnx_op

from ...kernels.reference import paged_prefill_attention_ref, write_kv_ref
from ...models.config import ModelConfig
from .export import (
    ATTENTION_OP,
    BLOCK_TABLES,
    CONTEXT_LENS,
    DOMAIN,
    HIDDEN_IN,
    HIDDEN_OUT,
    POSITIONS,
    QUERY_START_LOC,
    SLOT_MAPPING,
    StepInputs,
    k_cache_input,
    k_cache_output,
    v_cache_input,
    v_cache_output,
)
from .plugin import ATTEND_OP, WRITE_KV_OP
from .runtime import ExportedDecoder, KvCaches

_F, _I32, _I64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64


def _write(key, value, k_cache, v_cache, slot_mapping) -> tuple[torch.Tensor, torch.Tensor]:
    k_new, v_new = torch.from_numpy(k_cache.copy()), torch.from_numpy(v_cache.copy())
    write_kv_ref(torch.from_numpy(key), torch.from_numpy(value), k_new, v_new, torch.from_numpy(slot_mapping))
    return k_new, v_new


def _attend(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale) -> np.ndarray:
    out = paged_prefill_attention_ref(
        torch.from_numpy(q), k_cache, v_cache, torch.from_numpy(block_tables),
        torch.from_numpy(query_start_loc), torch.from_numpy(context_lens), scale,
    )
    return out.numpy()


@onnx_op(op_type=ATTENTION_OP, inputs=[_F, _F, _F, _F, _F, _I32, _I32, _I64, _I32], outputs=[_F, _F, _F], attrs={"scale": _F})
def _paged_attention(q, key, value, k_cache, v_cache, block_tables, context_lens, slot_mapping, query_start_loc, scale):
    k_new, v_new = _write(key, value, k_cache, v_cache, slot_mapping)
    return _attend(q, k_new, v_new, block_tables, query_start_loc, context_lens, scale), k_new.numpy(), v_new.numpy()


@onnx_op(op_type=WRITE_KV_OP, inputs=[_F, _F, _F, _F, _I64], outputs=[_F, _F])
def _write_kv(key, value, k_cache, v_cache, slot_mapping):
    k_new, v_new = _write(key, value, k_cache, v_cache, slot_mapping)
    return k_new.numpy(), v_new.numpy()


@onnx_op(op_type=ATTEND_OP, inputs=[_F, _F, _F, _I32, _I32, _I32], outputs=[_F], attrs={"scale": _F})
def _paged_attend(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale):
    return _attend(q, torch.from_numpy(k_cache), torch.from_numpy(v_cache), block_tables, query_start_loc, context_lens, scale)


def ort_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """A CPU session for the graph with its `edgepaged` nodes served by the references above."""
    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    served = onnx.ModelProto()
    served.CopyFrom(proto)
    for node in served.graph.node:
        if node.domain == DOMAIN:
            node.domain = default_opset_domain()
    for opset in served.opset_import:
        if opset.domain == DOMAIN:
            opset.domain = default_opset_domain()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(served.SerializeToString(), options, providers=["CPUExecutionProvider"])


class OrtModel(ExportedDecoder):
    """An exported fp32 graph run by onnxruntime, with the shape `ModelRunner` drives."""

    def __init__(
        self, model: onnx.ModelProto | Path, config: ModelConfig, embed_tokens: torch.Tensor, lm_head: torch.Tensor | None
    ):
        super().__init__(config, embed_tokens, lm_head)
        self.session = ort_session(model)

    def run_decoder(self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: KvCaches, step: StepInputs) -> torch.Tensor:
        feeds = {
            HIDDEN_IN: hidden, POSITIONS: positions, SLOT_MAPPING: step.slot_mapping, BLOCK_TABLES: step.block_tables,
            CONTEXT_LENS: step.context_lens, QUERY_START_LOC: step.query_start_loc,
        }
        for layer, (k_cache, v_cache) in enumerate(kv_caches):
            feeds[k_cache_input(layer)], feeds[v_cache_input(layer)] = k_cache, v_cache
        names = [HIDDEN_OUT] + [n(i) for i in range(len(kv_caches)) for n in (k_cache_output, v_cache_output)]
        results = self.session.run(names, {k: v.detach().contiguous().numpy() for k, v in feeds.items()})
        pools = iter(results[1:])
        for k_cache, v_cache in kv_caches:
            k_cache.copy_(torch.from_numpy(next(pools)))
            v_cache.copy_(torch.from_numpy(next(pools)))
        return torch.from_numpy(results[0])

"""Fill our fused-layout model from a checkpoint, checking coverage.

Three sources: a Hugging Face folder's safetensors (copied into the model's dense parameters),
the GGUF file a folder's gguf.json names (loader.py), or a GPTQ/AWQ int4 folder
(quant/hf_int4.py). The last two are read natively: quantized tensors stay quantized
(edgepaged.quant) unless the caller asks for float weights, and every weight is put in place on
a model built with `weights_device="meta"`, so no dense copy of a quantized weight is ever
allocated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ModelLoadError
from ..quant import GGUFFile, PackedWeight, fused_weight, is_packed
from ..quant.hf_int4 import checkpoint_quantization, read_int4_checkpoint
from .llama import LlamaForCausalLM
from .loader import gguf_source

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _target(model: LlamaForCausalLM, name: str) -> tuple[nn.Module, str, int] | None:
    """(module, attribute, row offset) that checkpoint tensor `name` fills (None: not ours)."""
    cfg = model.config
    if name == "model.embed_tokens.weight":
        return model, "embed_tokens", 0
    if name == "model.norm.weight":
        return model.norm, "weight", 0
    if name == "lm_head.weight":
        return (model, "lm_head", 0) if model.lm_head is not None else None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer = model.layers[int(m.group(1))]
    rest = m.group(2)
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused = {
        "self_attn.qkv_proj": (layer.self_attn.qkv_proj, 0),  # Phi-3: already fused, same row order
        "self_attn.q_proj": (layer.self_attn.qkv_proj, 0),
        "self_attn.k_proj": (layer.self_attn.qkv_proj, q),
        "self_attn.v_proj": (layer.self_attn.qkv_proj, q + kv),
        "self_attn.o_proj": (layer.self_attn.o_proj, 0),
        "mlp.gate_up_proj": (layer.mlp.gate_up_proj, 0),  # Phi-3: gate rows, then up rows
        "mlp.gate_proj": (layer.mlp.gate_up_proj, 0),
        "mlp.up_proj": (layer.mlp.gate_up_proj, inter),
        "mlp.down_proj": (layer.mlp.down_proj, 0),
        "input_layernorm": (layer.input_layernorm, 0),
        "post_attention_layernorm": (layer.post_attention_layernorm, 0),
        "self_attn.q_norm": (layer.self_attn.q_norm, 0),  # Qwen3; None for the other families
        "self_attn.k_norm": (layer.self_attn.k_norm, 0),
    }
    module_name, _, kind = rest.rpartition(".")
    if module_name not in fused or kind not in ("weight", "bias"):
        return None
    module, offset = fused[module_name]
    if module is None:
        raise ModelLoadError(f"checkpoint has {name}, which a {cfg.architecture} model does not use")
    if getattr(module, kind, None) is None:
        raise ModelLoadError(f"checkpoint has {name} but the config says that layer has no {kind}")
    return module, kind, offset


def load_weights(model: LlamaForCausalLM, folder: Path, keep_quantized: bool = False) -> int:
    """Fill every weight from the folder's checkpoint; returns the bytes the weights hold.

    `keep_quantized` applies to a GGUF or GPTQ/AWQ checkpoint: its quantized tensors stay packed
    instead of being dequantized to the model's dtype. A float safetensors folder loads as it is.
    """
    gguf = gguf_source(folder)
    if gguf is not None:
        return load_gguf(model, gguf, keep_quantized)
    int4 = checkpoint_quantization(folder)
    if int4 is not None:
        return load_packed(model, folder, read_int4_checkpoint(folder, int4, keep_quantized))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors weights")
    filled: dict[int, int] = {}
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    target = _target(model, name)
                    if target is None:
                        continue
                    module, kind, offset = target
                    dest = _materialized(model, module, kind)
                    src = f.get_tensor(name)
                    rows = src.shape[0]
                    if dest.shape[1:] != src.shape[1:] or offset + rows > dest.shape[0]:
                        raise ModelLoadError(
                            f"{file.name}: {name} has shape {tuple(src.shape)}, which does not fit the config"
                        )
                    dest[offset : offset + rows].copy_(src)
                    filled[id(dest)] = filled.get(id(dest), 0) + src.numel()
    missing = [n for n, p in model.named_parameters() if filled.get(id(p), 0) != p.numel()]
    if missing:
        raise ModelLoadError(f"{folder}: checkpoint does not provide {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return weights_nbytes(model)


def load_gguf(model: LlamaForCausalLM, path: Path, keep_quantized: bool) -> int:
    """Fill the model from a GGUF file; returns the bytes the weights hold."""
    cfg = model.config
    try:
        source = GGUFFile(path)
    except Exception as exc:  # the gguf package raises many types for a bad or foreign file
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    tensors = source.tensors(cfg.num_heads, cfg.num_kv_heads, keep_quantized)
    return load_packed(model, path, ((t.name, t.value) for t in tensors))


def load_packed(model: LlamaForCausalLM, path: Path, tensors: Iterable[tuple[str, torch.Tensor | PackedWeight]]) -> int:
    """Fill a model built on meta from (Hugging Face name, dense tensor or packed weight) pairs
    (a GGUF file, an AWQ/GPTQ folder); returns the bytes the weights hold.

    The row blocks of a fused projection (q/k/v, gate/up) are gathered first and put in place
    together: concatenated when they share a format, else as a ConcatWeight (quant/linear.py).
    """
    device, dtype = model.rope_cos.device, model.rope_cos.dtype
    blocks: dict[tuple[int, str], tuple[nn.Module, list[tuple[int, str, object]]]] = {}
    for name, value in tensors:
        target = _target(model, name)
        if target is None:
            continue
        module, kind, offset = target
        blocks.setdefault((id(module), kind), (module, []))[1].append((offset, name, value))
    filled: set[int] = set()
    with torch.no_grad():
        for (_, kind), (module, parts) in blocks.items():
            parts.sort(key=lambda p: p[0])
            expected = getattr(module, kind).shape
            _check_rows(path, parts, expected)
            values = [v for _, _, v in parts]
            if any(is_packed(v) for v in values):
                _replace(module, kind, fused_weight(values, dtype, device))
            else:
                dense = torch.cat([v.reshape(-1, *expected[1:]) for v in values]).to(device=device, dtype=dtype)
                _replace(module, kind, nn.Parameter(dense.reshape(expected), requires_grad=False))
                filled.add(id(getattr(module, kind)))
    missing = [n for n, p in model.named_parameters() if id(p) not in filled]
    if missing:
        raise ModelLoadError(f"{path}: checkpoint does not provide {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return weights_nbytes(model)


def _check_rows(path: Path, parts: list[tuple[int, str, object]], expected: torch.Size) -> None:
    row = 0
    for offset, name, value in parts:
        shape = tuple(value.shape)
        cols = shape[1] if len(shape) > 1 else None
        if offset != row or (cols is not None and len(expected) > 1 and cols != expected[1]):
            raise ModelLoadError(f"{path}: {name} has shape {shape}, which does not fit the config")
        row += shape[0]
    if row != expected[0]:
        raise ModelLoadError(f"{path}: {parts[0][1]} and the tensors fused with it give {row} rows, the config {expected[0]}")


def _materialized(model: LlamaForCausalLM, module: nn.Module, kind: str) -> torch.Tensor:
    """The dense parameter `module.kind`, allocated on the model's device if it was left on meta."""
    param = getattr(module, kind)
    if param.is_meta:
        param = nn.Parameter(torch.empty_like(param, device=model.rope_cos.device), requires_grad=False)
        _replace(module, kind, param)
    return param


def _replace(module: nn.Module, kind: str, value: nn.Module | nn.Parameter) -> None:
    """Put a weight in place of `module.kind`, a dense parameter or a quantized weight module."""
    module._parameters.pop(kind, None)
    module._modules.pop(kind, None)
    setattr(module, kind, value)


def weights_nbytes(model: nn.Module) -> int:
    """Bytes of the model's weights: dense parameters and the buffers of quantized weights
    (the rope tables, also buffers, are not weights)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.startswith("rope_"))
    return params + packed

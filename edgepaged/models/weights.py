"""Copy a Hugging Face safetensors checkpoint into our fused-layout model, checking coverage."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from .llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _target(model: LlamaForCausalLM, name: str) -> tuple[torch.Tensor, int] | None:
    """The destination tensor and row offset for checkpoint tensor `name` (None: not ours)."""
    cfg = model.config
    if name == "model.embed_tokens.weight":
        return model.embed_tokens, 0
    if name == "model.norm.weight":
        return model.norm.weight, 0
    if name == "lm_head.weight":
        return (model.lm_head, 0) if model.lm_head is not None else None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer = model.layers[int(m.group(1))]
    rest = m.group(2)
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused = {
        "self_attn.q_proj": (layer.self_attn.qkv_proj, 0),
        "self_attn.k_proj": (layer.self_attn.qkv_proj, q),
        "self_attn.v_proj": (layer.self_attn.qkv_proj, q + kv),
        "self_attn.o_proj": (layer.self_attn.o_proj, 0),
        "mlp.gate_proj": (layer.mlp.gate_up_proj, 0),
        "mlp.up_proj": (layer.mlp.gate_up_proj, inter),
        "mlp.down_proj": (layer.mlp.down_proj, 0),
        "input_layernorm": (layer.input_layernorm, 0),
        "post_attention_layernorm": (layer.post_attention_layernorm, 0),
    }
    module_name, _, kind = rest.rpartition(".")
    if module_name not in fused or kind not in ("weight", "bias"):
        return None
    module, offset = fused[module_name]
    tensor = getattr(module, kind, None)
    if tensor is None:
        raise ModelLoadError(f"checkpoint has {name} but the config says that layer has no {kind}")
    return tensor, offset


def load_weights(model: LlamaForCausalLM, folder: Path) -> int:
    """Fill every parameter from the folder's *.safetensors files; returns bytes loaded."""
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
                    dest, offset = target
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
    return sum(p.numel() * p.element_size() for p in model.parameters())

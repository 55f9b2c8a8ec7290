"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

The model sees a flat batch of tokens from many sequences at once; where each token's keys and
values live, and what it may attend to, is the attention backend's business. q/k/v and
gate/up projections are fused into one matmul each: fewer, larger kernels per layer.

On CUDA the elementwise work between the matmuls (residual add + RMSNorm, rope, SiLU * up)
runs as one Triton kernel each instead of a chain of eager ops, and the residual stream travels
beside the hidden states so the add fuses into the next norm. The CPU path keeps the eager ops,
which match transformers bit for bit; the choice is made once, at construction.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionBackend
from .config import ModelConfig
from .rope import rope_tables


@functools.cache
def _kernels():
    """edgepaged.kernels, imported only for a CUDA model: CPU installs need not have Triton."""
    from .. import kernels

    return kernels


def _param(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.weight = _param(dim, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, so fp16/bf16 runs stay faithful.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add folded into the norm's kernel."""
        return _kernels().fused_add_rms_norm(x, residual, self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype, device):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_bias, dtype, device)
        self.backend = backend

    def forward(self, x, cos, sin, k_cache, v_cache, prepared) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, k_cache, v_cache, prepared)
        return self.o_proj(out.reshape(t, self.q_size))

    def forward_fused(self, x, positions, cos_table, sin_table, k_cache, v_cache, prepared) -> torch.Tensor:
        """Rope applied in place on the QKV output, the tables indexed by position in the kernel."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        _kernels().rotary_embedding_(q, k, positions, cos_table, sin_table)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, k_cache, v_cache, prepared)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_kernels().silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(self, x, cos, sin, k_cache, v_cache, prepared) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, prepared)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self, x, residual, positions, cos_table, sin_table, k_cache, v_cache, prepared
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the caller's next norm adds
        the two, so no separate add kernel runs. residual is None for the first layer."""
        h, residual = self.input_layernorm.forward_fused(x, residual)
        h = self.self_attn.forward_fused(h, positions, cos_table, sin_table, k_cache, v_cache, prepared)
        h, residual = self.post_attention_layernorm.forward_fused(h, residual)
        return self.mlp.forward_fused(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device, max_positions: int):
        super().__init__()
        self.config = cfg
        self.fused = torch.device(device).type == "cuda"
        if self.fused:
            _kernels()  # a missing or broken Triton fails the load, not the first step
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = None if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, device)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, prepared) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for a flat batch of T tokens."""
        x = F.embedding(input_ids, self.embed_tokens)
        if self.fused:
            residual = None
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                x, residual = layer.forward_fused(
                    x, residual, positions, self.rope_cos, self.rope_sin, k_cache, v_cache, prepared
                )
            return self.norm.forward_fused(x, residual)[0]
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, prepared)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden, weight)

"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3/Phi-4-mini, SmolLM) over a
paged KV cache.

The model sees a flat batch of tokens from many sequences at once; where each token's keys and
values live, and what it may attend to, is the attention backend's business. q/k/v and
gate/up projections are fused into one matmul each: fewer, larger kernels per layer.

On CUDA the elementwise work between the matmuls (residual add + RMSNorm, rope, SiLU * up)
runs as one Triton kernel each instead of a chain of eager ops, and the residual stream travels
beside the hidden states so the add fuses into the next norm. The CPU path runs eager ops, as
few as it can: at batch 1 a layer's dozen small tensors cost more in per-op dispatch than in
arithmetic, so each op counts (docs/benchmarks/cpu-decode-notes.md). The residual stream, the
norms, rope and attention stay in the model's dtype; each projection's input is handed over in
the dtype its weight computes in (`Linear.compute_dtype`: bfloat16 for packed CPU weights,
which have no fast float32 kernel), and the output projections' results stay in that dtype
until the residual add promotes them, so no conversion runs around a matmul (SiLU * up runs
in float32 between the MLP's two, see `MLP.forward`). The choice is made once, at construction.

A one-token step (batch-1 decode) on CUDA goes further (`DecodeFusions`, kernels/decode_gemv.py):
add + norm + QKV + rope + KV write is one launch (the first layer's reads the embedding row
itself), add + norm + gate_up + SiLU * up another, o_proj and down_proj a GEMV each, and a greedy
row's lm_head returns the token. A projection whose weight is quantized, or a layer the fused
epilogue does not cover, takes the path above.

The families differ only in attention: Qwen3 RMS-normalises each q and k head before rope
(`q_norm`/`k_norm`), and Phi-4-mini rotates only the first `rotary_dim` dims of each head
(partial rotary; the rope tables are that wide), on both paths.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionBackend
from ..config import DecodeFusions
from .config import ModelConfig
from .rope import rope_tables


@functools.cache
def _kernels():
    """edgepaged.kernels, imported only for a CUDA model: CPU installs need not have Triton."""
    from .. import kernels

    return kernels


def _param(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. A dense weight is a tensor; a quantized one (edgepaged.quant) is an
    object that runs its own kernel, so the model code is the same for every weight format."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight.linear(x, bias)


def project(x: torch.Tensor, layer: Linear, gemv: bool) -> torch.Tensor:
    """layer(x), through the decode GEMV for one token of a dense weight when `gemv`."""
    if gemv and x.shape[0] == 1 and isinstance(layer.weight, torch.Tensor):
        return _kernels().decode_gemv(x, layer.weight, layer.bias)[0]
    return layer(x)


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """The rows of `weight` for `ids`, dequantized when the weight is quantized."""
    return F.embedding(ids, weight) if isinstance(weight, torch.Tensor) else weight.embedding(ids)


class Linear(nn.Module):
    """`weight` is a dense parameter, or the quantized weight the loader put in its place."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype the weight's kernel reads and writes (no conversion around it)."""
        w = self.weight
        return w.dtype if isinstance(w, torch.Tensor) else w.compute_dtype

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """self(x) with x handed over in the compute dtype, so the result stays in it: for a
        caller whose next op (the residual add) promotes it anyway. The check is Python's: a
        no-op `to` still costs a dispatch at batch 1."""
        dtype = self.compute_dtype
        return self(x if x.dtype == dtype else x.to(dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.weight = _param(dim, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """In `out_dtype` (default x's): what the next projection computes in. torch's own op
        normalises a float32 x as the reference implementation does, in one call."""
        y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return y if out_dtype is None or out_dtype == y.dtype else y.to(out_dtype)

    def forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add folded into the norm's kernel."""
        return _kernels().fused_add_rms_norm(x, residual, self.weight, self.eps)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., rotary_dim] with rotate-half's sign folded in (-sin on the first half), for
    `apply_rope`: computed once a step instead of a negation per layer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos and `signed_sin` [T, 1, rotary_dim]. transformers'
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): the halves swapped (a roll
    by half, (x2, x1)) times the signed sin, three ops in all. Dims past rotary_dim (partial
    rotary) pass through unchanged, as in transformers' apply_rotary_pos_emb."""
    rotary_dim = cos.shape[-1]
    if rotary_dim != x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    return torch.addcmul(x * cos, x.roll(rotary_dim // 2, -1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype, device):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_bias, dtype, device)
        # Qwen3: RMSNorm over each head's dims, one weight shared by all q heads, one by all k heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.rotary_dim = cfg.rotary_dim
        self.backend = backend
        self.dtype = dtype

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D]: views of the fused projection's output."""
        t, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)

    def forward(self, x, cos, sin, k_cache, v_cache, prepared) -> torch.Tensor:
        """The output projection's result in its compute dtype (the caller's residual add
        promotes it). q and k are roped together, as one tensor of Hq + Hkv heads, unless
        Qwen3's norms (one weight for q, another for k) come first."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if qkv.dtype != self.dtype:
            qkv = qkv.to(self.dtype)
        if self.q_norm is not None:
            q, k, v = self._heads(qkv)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:
            qk_size = self.q_size + self.kv_size
            qk = apply_rope(qkv[:, :qk_size].view(t, -1, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, k_cache, v_cache, prepared)
        return self.o_proj.compute(out.reshape(t, self.q_size))

    def fuses_qkv(self, k_cache) -> bool:
        """Whether a one-token step can run norm + QKV + rope + KV write as one launch: a dense
        weight, full rotary, no q/k norms, a 16-bit pool and a backend that then attends only."""
        return (
            isinstance(self.qkv_proj.weight, torch.Tensor)
            and self.q_norm is None
            and self.rotary_dim == self.head_dim
            and isinstance(k_cache, torch.Tensor)
            and self.backend.attends_written_kv
        )

    def forward_one(self, x, residual, norm: RMSNorm, ids, positions, cos_table, sin_table, k_cache, v_cache,
                    prepared, gemv: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output after o_proj, residual stream) of one token: the norm's prologue,
        rope and the K/V write ride on the QKV launch, so attention only reads. With `ids`, x is
        the embedding table and the row is gathered in the same launch."""
        kernels = _kernels()
        rope = kernels.RopeKV(self.num_heads, self.num_kv_heads, self.head_dim, positions, cos_table, sin_table,
                              prepared.batch.slot_mapping, k_cache, v_cache)
        prologue = kernels.GemvPrologue(norm.weight, residual, ids, norm.eps)
        q, residual = kernels.decode_gemv(x, self.qkv_proj.weight, self.qkv_proj.bias, prologue=prologue,
                                          epilogue=kernels.ROPE_KV, rope_kv=rope)
        out = self.backend.attend_written(q.view(1, self.num_heads, self.head_dim), k_cache, v_cache, prepared)
        return project(out.view(1, self.q_size), self.o_proj, gemv), residual

    def forward_fused(self, x, positions, cos_table, sin_table, k_cache, v_cache, prepared, gemv: bool = False):
        """Rope applied in place on the QKV output, the tables indexed by position in the kernel.

        Qwen3's q/k norms run first, through the fused norm kernel with no residual, one head
        per row (q and k are strided views of the QKV output, so flattening them copies once);
        rope then rotates the normalised copies in place. Under partial rotary the kernel gets
        the leading `rotary_dim` of each head as a strided view, the tables that wide."""
        q, k, v = self._heads(self.qkv_proj(x))
        if self.q_norm is not None:
            q = self.q_norm.forward_fused(q.reshape(-1, self.head_dim), None)[0].view(q.shape)
            k = self.k_norm.forward_fused(k.reshape(-1, self.head_dim), None)[0].view(k.shape)
        rd = self.rotary_dim
        _kernels().rotary_embedding_(q[..., :rd], k[..., :rd], positions, cos_table, sin_table)
        out = self.backend.forward(q, k, v, k_cache, v_cache, prepared)
        return project(out.reshape(x.shape[0], self.q_size), self.o_proj, gemv)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's result in its compute dtype. SiLU * up runs in float32 and is
        rounded once, as the reference computes it: in bfloat16 (two roundings) greedy
        decodes of quantized models part from their float32 dequantisation on near-ties."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj.compute(F.silu(gate.float()) * up)

    def forward_fused(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, fusions: DecodeFusions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(down_proj(silu(gate) * up) of norm(x + residual), x + residual); for one token of a
        dense gate_up the add, the norm and SiLU * up ride on the gate_up launch."""
        kernels = _kernels()
        if fusions.mlp and x.shape[0] == 1 and isinstance(self.gate_up_proj.weight, torch.Tensor):
            prologue = kernels.GemvPrologue(norm.weight, residual, None, norm.eps)
            h, residual = kernels.decode_gemv(x, self.gate_up_proj.weight, self.gate_up_proj.bias,
                                              prologue=prologue, epilogue=kernels.SILU_MUL)
        else:
            h, residual = norm.forward_fused(x, residual)
            h = kernels.silu_and_mul(self.gate_up_proj(h))
        return project(h, self.down_proj, fusions.gemv), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(self, x, cos, sin, k_cache, v_cache, prepared) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        x = x + attn(self.input_layernorm(x, attn.qkv_proj.compute_dtype), cos, sin, k_cache, v_cache, prepared)
        return x + mlp(self.post_attention_layernorm(x, mlp.gate_up_proj.compute_dtype))

    def forward_fused(
        self, x, residual, positions, cos_table, sin_table, k_cache, v_cache, prepared,
        fusions: DecodeFusions, ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the caller's next norm adds
        the two, so no separate add kernel runs. residual is None for the first layer; `ids`
        (first layer, one token) means x is the embedding table, read in the QKV launch."""
        attn = self.self_attn
        if ids is not None or (fusions.qkv and x.shape[0] == 1 and attn.fuses_qkv(k_cache)):
            h, residual = attn.forward_one(x, residual, self.input_layernorm, ids, positions, cos_table, sin_table,
                                           k_cache, v_cache, prepared, fusions.gemv)
        else:
            h, residual = self.input_layernorm.forward_fused(x, residual)
            h = attn.forward_fused(h, positions, cos_table, sin_table, k_cache, v_cache, prepared, fusions.gemv)
        return self.mlp.forward_fused(h, residual, self.post_attention_layernorm, fusions)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device, max_positions: int,
        weights_device: torch.device | str | None = None,
    ):
        """`weights_device="meta"` allocates no weights: the loader then puts each in place, dense
        or quantized (models/weights.py), so a quantized checkpoint never has a dense copy."""
        super().__init__()
        self.config = cfg
        self.fused = torch.device(device).type == "cuda"
        # Settable for measurement before decode graphs are captured (ModelRunner.set_decode_fusions).
        self.decode_fusions = DecodeFusions.from_env()
        self._argmax_scratch = None
        if self.fused:
            _kernels()  # a missing or broken Triton fails the load, not the first step
        wdev = device if weights_device is None else weights_device
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=wdev)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, dtype, wdev) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, wdev)
        self.lm_head = None if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=wdev)
        cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, device)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, prepared) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for a flat batch of T tokens."""
        if self.fused:
            fusions = self.decode_fusions
            gather = (
                fusions.qkv
                and input_ids.shape[0] == 1
                and isinstance(self.embed_tokens, torch.Tensor)
                and self.layers[0].self_attn.fuses_qkv(kv_caches[0][0])
            )
            x = self.embed_tokens if gather else embedding(input_ids, self.embed_tokens)
            ids, residual = (input_ids if gather else None), None
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                x, residual = layer.forward_fused(
                    x, residual, positions, self.rope_cos, self.rope_sin, k_cache, v_cache, prepared, fusions, ids
                )
                ids = None
            return self.norm.forward_fused(x, residual)[0]
        x = embedding(input_ids, self.embed_tokens)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = signed_sin(self.rope_sin[positions]).unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, prepared)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.embed_tokens if self.lm_head is None else self.lm_head)

    def folds_greedy(self, num_rows: int) -> bool:
        """Whether `greedy_tokens` applies: one row, a dense lm_head, the fusion on (CUDA)."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return self.fused and self.decode_fusions.greedy and num_rows == 1 and isinstance(weight, torch.Tensor)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax of compute_logits(hidden) [1, hidden] as int64 [1], in one launch that never
        writes the logits (the lm_head GEMV reduces its own maxima)."""
        kernels = _kernels()
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        if self._argmax_scratch is None:
            self._argmax_scratch = kernels.argmax_scratch_for(*weight.shape, weight.device)
        return kernels.decode_gemv(hidden, weight, epilogue=kernels.ARGMAX, argmax_scratch=self._argmax_scratch)[0]

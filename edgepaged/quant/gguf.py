"""Read a GGUF file's weights as they are stored: block-quantized tensors repacked into the
shared layouts of formats.py, float tensors as tensors.

The raw bytes are views of one memory map of the file (`TensorTable`: nothing is read twice).
Each GGML block type is a fixed-size record per block along a row; the repackers below turn a
[N, blocks * record] byte matrix into the [N, ...] tensors of formats.py:

- Q4_0 (32 values, 18 bytes): d f16, 16 bytes of nibbles (values 0-15 low, 16-31 high);
  w = (q - 8) d, so scale d, offset -8d.
- Q4_1 (32, 20): d f16, m f16, nibbles as Q4_0; w = q d + m.
- Q8_0 (32, 34): d f16, 32 int8; w = q d.
- Q4_K (256, 144): d f16, dmin f16, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32,
  128 bytes of nibbles (bytes 32c..32c+31 hold sub-block 2c low, 2c+1 high);
  w = d sc_j q - dmin m_j (G=32).
- Q6_K (256, 210): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16
  values), d f16; w = d sc (q6 - 32) (int8, G=16).

Any other block type is dequantized to float32 by the gguf package and kept dense. llama.cpp's
converter permutes the rows of llama q/k weights for its rope; `unpermute_rope_rows` undoes it
on rows, which is valid on packed rows too (blocks run along K). It leaves qwen3 and phi3 rows
as they are (their rope rotates halves, as Hugging Face's does); qwen3 adds `attn_q_norm` /
`attn_k_norm`, phi3 keeps q/k/v fused in `attn_qkv` and gate/up in `ffn_up`, and
`complete_hf_config` reads the metadata transformers' GGUF config reader skips for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .formats import Int4Weight, Int8Weight, PackedWeight, pack_nibbles

# GGUF tensor name (blk.N. prefix removed) -> Hugging Face name, as in transformers' GGUF mapping.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3: q, k, v rows fused, as in its checkpoints
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp's phi3 has no ffn_gate: its ffn_up is the checkpoint's gate_up_proj (gate rows, then
# up rows, twice the intermediate size), kept fused.
_ARCH_LAYER_NAMES = {"phi3": {"ffn_up": "mlp.gate_up_proj"}}
# Phi-3's longrope factors, one per rotary frequency pair: tensors in a GGUF, config in a checkpoint.
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
_FLOAT_TYPES = ("F32", "F16", "BF16")


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face checkpoint name of a GGUF tensor (None: not a weight the decoder uses)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        layer = _ARCH_LAYER_NAMES.get(architecture, {}).get(parts[2]) or _LAYER_NAMES[parts[2]]
        return f"model.layers.{parts[1]}.{layer}.{parts[3]}"
    return None


def _blocks(data: np.ndarray, record: int) -> np.ndarray:
    """uint8 [N, nb * record] -> uint8 [N, nb, record] (a view of the reader's memory map; the
    repackers only read it). The bit work is numpy's: torch's uint8 ops on the CPU are ~50x slower."""
    return data.reshape(data.shape[0], -1, record)


def _f16(b: np.ndarray) -> np.ndarray:
    """The float16 in the two bytes of the last axis: uint8 [..., 2] -> float16 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _repack_32(qs: np.ndarray) -> torch.Tensor:
    """GGML's 16 nibble bytes of a 32-value block (values 0-15 in the low nibbles, 16-31 in the
    high) [N, nb, 16] -> the shared layout's bytes (value 2j low, 2j+1 high) [N, nb * 16]:
    byte j < 8 takes the low nibbles of bytes 2j and 2j+1, byte 8 + j their high nibbles."""
    n, nb = qs.shape[:2]
    even, odd = qs[..., 0::2], qs[..., 1::2]
    out = np.empty((n, nb, 16), dtype=np.uint8)
    np.bitwise_or(even & 0x0F, odd << 4, out=out[..., :8])
    np.bitwise_or(even >> 4, odd & 0xF0, out=out[..., 8:])
    return torch.from_numpy(out.reshape(n, nb * 16))


def repack_q4_0(data: np.ndarray) -> Int4Weight:
    b = _blocks(data, 18)
    d = _t(_f16(b[..., 0:2]))
    return Int4Weight(_repack_32(b[..., 2:18]), d, -8 * d, 32)


def repack_q4_1(data: np.ndarray) -> Int4Weight:
    b = _blocks(data, 20)
    return Int4Weight(_repack_32(b[..., 4:20]), _t(_f16(b[..., 0:2])), _t(_f16(b[..., 2:4])), 32)


def repack_q8_0(data: np.ndarray) -> Int8Weight:
    b = _blocks(data, 34)
    q = np.ascontiguousarray(b[..., 2:34]).view(np.int8).reshape(b.shape[0], -1)
    return Int8Weight(torch.from_numpy(q), _t(_f16(b[..., 0:2])), 32)


def _q4_k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes [N, nb, 12] -> 6-bit scales and mins [N, nb, 8] (llama.cpp's get_scale_min_k4)."""
    s = s.astype(np.int32)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return np.concatenate((lo_sc, hi_sc), -1), np.concatenate((lo_m, hi_m), -1)


def repack_q4_k(data: np.ndarray) -> Int4Weight:
    b = _blocks(data, 144)
    n, nb = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]).astype(np.float32), _f16(b[..., 2:4]).astype(np.float32)
    sc, m = _q4_k_scales_mins(b[..., 4:16])
    qs = b[..., 16:144].reshape(n, nb, 4, 32)  # chunk c: sub-block 2c low nibbles, 2c+1 high
    q = np.stack((qs & 0xF, qs >> 4), axis=3).reshape(n, -1)
    scales = (d[..., None] * sc).reshape(n, -1).astype(np.float16)
    offsets = (-(dmin[..., None] * m)).reshape(n, -1).astype(np.float16)
    return Int4Weight(pack_nibbles(q), _t(scales), _t(offsets), 32)


def repack_q6_k(data: np.ndarray) -> Int8Weight:
    b = _blocks(data, 210)
    n, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(n, nb, 2, 64)
    qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210]).astype(np.float32)
    # Per half of 128 values, four runs of 32: low nibbles of ql[0:32], ql[32:64], then the high
    # nibbles of both; run r takes bits 2r..2r+1 of qh as its top two bits.
    low = np.concatenate((ql & 0xF, ql >> 4), axis=-1).reshape(n, nb, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(n, -1)
    scales = (d[..., None] * sc).reshape(n, -1).astype(np.float16)
    return Int8Weight(torch.from_numpy(q), _t(scales), 16)


REPACKERS = {"Q4_0": repack_q4_0, "Q4_1": repack_q4_1, "Q8_0": repack_q8_0, "Q4_K": repack_q4_k, "Q6_K": repack_q6_k}


def packed_nbytes(type_name: str, n: int, k: int) -> int | None:
    """Bytes of an [n, k] GGUF tensor of `type_name` once repacked (None: it is not kept packed)."""
    if type_name not in REPACKERS:
        return None
    group = 16 if type_name == "Q6_K" else 32
    if type_name in ("Q8_0", "Q6_K"):
        return n * k + n * (k // group) * 2
    return n * k // 2 + n * (k // group) * 4


# llama.cpp's Q4_K_M, on the safe side: it gives Q6_K to attn_v and ffn_down in about half the
# layers, this to all of them (and to the embedding, which a tied model also reads as its lm_head).
Q4_K_M = {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q6_K", "output": "Q6_K"}


def recipe_bytes(cfg, recipe: dict[str, str], float_bytes: int) -> int:
    """Bytes a llama-shaped model's weights would take once loaded from a GGUF whose matrices
    have the types of `recipe` (GGUF tensor kind -> type, "default" for the others; a type that
    is not kept packed counts at `float_bytes`), norms at `float_bytes`: the planner's weight
    figure for a model without its file. `cfg` is a models.config.ModelConfig."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    layer = [("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, q),
             ("ffn_gate", inter, h), ("ffn_up", inter, h), ("ffn_down", h, inter)]
    matrices = [("token_embd", cfg.vocab_size, h)] + ([] if cfg.tie_word_embeddings else [("output", cfg.vocab_size, h)])
    total = (2 * cfg.num_layers + 1) * h * float_bytes
    for kind, n, k in matrices + layer * cfg.num_layers:
        packed = packed_nbytes(recipe.get(kind, recipe["default"]), n, k)
        total += packed if packed is not None else n * k * float_bytes
    return total


def gguf_name(hf: str) -> str:
    """The GGUF tensor name of a Hugging Face weight name (the inverse of `hf_name`)."""
    for gguf_key, hf_key in _GLOBAL_NAMES.items():
        if hf == hf_key:
            return gguf_key
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    layer = {v: k for names in (_LAYER_NAMES, *_ARCH_LAYER_NAMES.values()) for k, v in names.items()}
    if m is None or m.group(2) not in layer:
        raise ValueError(f"{hf} has no GGUF name")
    return f"blk.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"


def permute_rope_rows(rows: int, num_heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter stores q/k weights in: gguf[r] = hf[perm[r]] (the inverse
    of `unpermute_rope_rows`)."""
    head_dim = rows // num_heads
    return torch.arange(rows).view(num_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def write_gguf(
    path: Path, tensors: Iterable[tuple[str, np.ndarray, str]], num_heads: int, num_kv_heads: int,
    architecture: str = "llama", hf_rows: bool = True, metadata: dict[str, bool | int | float | str] | None = None,
) -> Path:
    """A GGUF file of decoder weights given under Hugging Face names, for tests and benchmarks.

    Each entry is (name, value, GGUF type): a float array stored as F32/F16, or quantized to
    Q4_0/Q4_1/Q8_0 by the gguf package; a uint8 array is taken as blocks already in that type
    ([N, bytes], how the K-quants get in: the gguf package cannot quantize them). The names of
    ROPE_FACTOR_TENSORS are GGUF names already. llama q/k rows given in Hugging Face order
    (`hf_rows`) are stored in llama.cpp's rope order, as its converter writes them; random
    values can be drawn as stored (hf_rows=False). `metadata` holds the architecture's keys
    without the `<architecture>.` prefix ("attention.key_length": 32, ...): bool, uint32,
    float32 or string as the value's type is; without them the config comes from the folder's
    config.json (models/loader.py).
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), architecture)
    adders = ((bool, writer.add_bool), (int, writer.add_uint32), (float, writer.add_float32), (str, writer.add_string))
    for key, value in (metadata or {}).items():
        next(add for kind, add in adders if isinstance(value, kind))(f"{architecture}.{key}", value)
    for name, value, kind in tensors:
        if hf_rows and architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = num_heads if ".q_proj." in name else num_kv_heads
            value = value[permute_rope_rows(value.shape[0], heads).numpy()]
        stored = name if name in ROPE_FACTOR_TENSORS else gguf_name(name)
        if kind in ("F32", "F16"):
            writer.add_tensor(stored, np.ascontiguousarray(value, dtype=np.float32 if kind == "F32" else np.float16))
            continue
        qtype = getattr(GGMLQuantizationType, kind)
        raw = value if value.dtype == np.uint8 else quantize(np.asarray(value, dtype=np.float32), qtype)
        writer.add_tensor(stored, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def unpermute_rope_rows(rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: hf[r] = gguf[perm[r]].

    llama.cpp stores each head's rows interleaved (the two rope halves alternate); HF keeps the
    halves apart: HF row h*D + j*D/2 + i is GGUF row h*D + 2i + j.
    """
    head_dim = rows // num_heads
    return torch.arange(rows).view(num_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # the Hugging Face name
    gguf_type: str
    value: torch.Tensor | PackedWeight  # float32/f16/bf16 tensor, or a packed weight


@dataclass(frozen=True, slots=True)
class _StoredTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the row length first
    data: np.ndarray  # a view of the memory map, shaped as GGUFReader shapes it


# GGUF metadata value types with a fixed size, by type id (4 is uint32 ... 12 is float64).
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
            10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class TensorTable:
    """A GGUF file's tensors as views of one memory map, from its header alone.

    The `gguf` package's GGUFReader also parses every metadata value into numpy views: for the
    default model's 49,152-token vocabulary and merges that was 2-3 s of a 4 s start (2-core
    x86). Weights and the model's shape need only the tensor table and the scalar metadata, so
    arrays are skipped, reading nothing but the string lengths; `metadata` holds the scalars
    and strings as Python values."""

    def __init__(self, path: Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.mm = np.memmap(path, mode="r")
        self.pos = 0
        if bytes(self.mm[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        self.pos = 8  # magic, version
        n_tensors, n_kv = self._u64(), self._u64()
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u32()
            value = self._value(vtype)
            if value is not None:
                self.metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = tuple(self._u64() for _ in range(self._u32()))
            infos.append((name, dims, GGMLQuantizationType(self._u32()), self._u64()))
        align = int(self.metadata.get("general.alignment") or 32)
        start = -(-self.pos // align) * align
        floats = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
        self.tensors = []
        for name, dims, kind, offset in infos:
            n_elems = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[kind]
            shape = tuple(reversed(dims))
            if kind.name in floats:
                dtype, count = floats[kind.name], n_elems
            else:
                dtype, count = np.uint8, n_elems * type_size // block
                shape = quant_shape_to_byte_shape(shape, kind)
            at = start + offset
            data = self.mm[at : at + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
            self.tensors.append(_StoredTensor(name, kind, dims, data))

    def _u32(self) -> int:
        value = int(self.mm[self.pos : self.pos + 4].view(np.uint32)[0])
        self.pos += 4
        return value

    def _u64(self) -> int:
        value = int(self.mm[self.pos : self.pos + 8].view(np.uint64)[0])
        self.pos += 8
        return value

    def _str(self) -> str:
        n = self._u64()
        value = bytes(self.mm[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return value

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            etype, count = self._u32(), self._u64()
            if etype == _STRING:
                for _ in range(count):
                    n = self._u64()  # not `self.pos += self._u64()`: that adds to the old position
                    self.pos += n
            elif etype == _ARRAY:
                for _ in range(count):
                    self._value(_ARRAY)
            else:
                self.pos += np.dtype(_SCALARS[etype]).itemsize * count
            return None
        dtype = np.dtype(_SCALARS[vtype])
        raw = self.mm[self.pos : self.pos + dtype.itemsize]
        self.pos += dtype.itemsize
        return raw.view(dtype)[0].item()


def complete_hf_config(table: TensorTable, config: dict[str, Any]) -> dict[str, Any]:
    """`config` (transformers' reading of the file's metadata, as a config dict) with what its
    GGUF reader leaves out, read the way llama.cpp's converter writes it: the head size
    (`attention.key_length`: Qwen3's is not hidden / heads), the rotary dims
    (`rope.dimension_count`: Phi-4-mini rotates 3/4 of each head), whether the embedding is
    tied (no output.weight), and Phi-3's sliding window (0: none) and longrope (its factors are
    tensors, its pretraining length and attention factor `rope.scaling.*` keys). Without them
    a Qwen3 or Phi-3 GGUF would load with the wrong head size or rope and no error."""
    arch = table.metadata.get("general.architecture")

    def meta(key: str):
        return table.metadata.get(f"{arch}.{key}")

    out = dict(config)
    head_dim = meta("attention.key_length") or out["hidden_size"] // out["num_attention_heads"]
    if meta("attention.key_length"):
        out["head_dim"] = head_dim
    out["tie_word_embeddings"] = not any(t.name == "output.weight" for t in table.tensors)
    v5 = "rope_parameters" in out  # transformers 5 keeps rope settings in one dict; 4 in rope_scaling
    rope = dict(out.get("rope_parameters") if v5 else out.get("rope_scaling") or {})
    rotary = meta("rope.dimension_count")
    if rotary and rotary != head_dim:
        (rope if v5 else out)["partial_rotary_factor"] = rotary / head_dim
    if arch == "phi3":
        out["sliding_window"] = meta("attention.sliding_window") or None
        if meta("rope.scaling.original_context_length"):
            out["original_max_position_embeddings"] = meta("rope.scaling.original_context_length")
        factors = {key: t.data.astype(np.float64).tolist() for t in table.tensors
                   if (key := ROPE_FACTOR_TENSORS.get(t.name))}
        if factors:
            rope |= factors | {"rope_type": "longrope"}
            if meta("rope.scaling.attn_factor") is not None:
                rope["attention_factor"] = meta("rope.scaling.attn_factor")
    out["rope_parameters" if v5 else "rope_scaling"] = rope or None
    return out


class GGUFFile:
    """A GGUF checkpoint's decoder weights, under Hugging Face names, in their stored format."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = TensorTable(self.path)
        self.architecture = self.reader.metadata.get("general.architecture")

    def tensors(
        self, num_heads: int, num_kv_heads: int, keep_quantized: bool = True, only: set[str] | None = None
    ) -> Iterator[GGUFTensor]:
        """Every decoder weight (or those named in `only`), q/k rows back in HF order.
        `keep_quantized=False` dequantizes every block type with the gguf package's own
        dequantisation (the reference)."""
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            name = hf_name(t.name, self.architecture)
            if name is None or (only is not None and name not in only):
                continue
            kind = t.tensor_type.name
            n = int(t.shape[-1]) if len(t.shape) > 1 else int(t.shape[0])
            if kind in _FLOAT_TYPES:
                value = _float_tensor(t.data, kind)
            elif keep_quantized and kind in REPACKERS:
                value = REPACKERS[kind](t.data)
            else:
                value = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(n, -1).astype(np.float32))
            if self.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
                perm = unpermute_rope_rows(value.shape[0], num_heads if ".q_proj." in name else num_kv_heads)
                value = value[perm] if isinstance(value, torch.Tensor) else value.take_rows(perm)
            yield GGUFTensor(name, kind, value)

    def tensor_bytes(self, float_bytes: int, keep_quantized: bool = True) -> int:
        """Bytes the decoder's weights take once loaded (quantized ones in the packed layouts)."""
        total = 0
        for t in self.reader.tensors:
            if hf_name(t.name, self.architecture) is None:
                continue
            numel = int(np.prod([int(x) for x in t.shape]))
            packed = packed_nbytes(t.tensor_type.name, numel // int(t.shape[0]), int(t.shape[0])) if keep_quantized else None
            total += packed if packed is not None else numel * float_bytes
        return total


def _float_tensor(data: np.ndarray, kind: str) -> torch.Tensor:
    raw = np.array(data)  # a copy: the tensor outlives the memory map, and torch wants it writable
    if kind == "BF16":  # numpy has no bfloat16: the reader hands out the raw bytes
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)

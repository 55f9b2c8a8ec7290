"""Hugging Face int4 checkpoints, GPTQ and AWQ (GEMM), repacked into the shared Int4Weight layout.

Both store, per linear layer `prefix`, int32 words of eight 4-bit values, `prefix.qzeros` and
float16 `prefix.scales` [K/G, N] (K input features, N output features, G the group size), and
mean w[n, k] = (q[k, n] - zero[k // G, n]) * scale[k // G, n], which is the shared layout's
q * scale + offset with offset = -zero * scale. They differ in how the words are packed:

- GPTQ (AutoGPTQ, GPTQModel): `qweight` [K/8, N] packs eight consecutive k of one column, k = 8r + i
  in bits 4i..4i+3 of word (r, n); `qzeros` [K/G, N/8] packs eight consecutive columns of a
  group the same way. In the original format (`checkpoint_format` "gptq", the default) a stored
  zero is the zero minus one, and the loader adds the one back (the historic off-by-one that
  GPTQModel's "gptq_v2" format drops). `g_idx` [K] gives each k's group: it must be k // G
  (checkpoints quantized with `desc_act` store a permutation, which these kernels do not run).
- AWQ, GEMM version (AutoAWQ): `qweight` [K, N/8] and `qzeros` [K/G, N/8] pack eight columns per
  word in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7]: bits 4i..4i+3 hold column
  8c + AWQ_ORDER[i]. Zeros are stored as they are.

The format is read from config.json's `quantization_config` (or an older checkpoint's
quantize_config.json). A group of a multiple of 128 (or -1, one group per row) becomes groups of
128 with the scale and offset repeated: the same weights, in a group size every kernel takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from .formats import Int4Weight, pack_nibbles

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its eight
_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)
_KERNEL_GROUP = 128
_PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Int4Checkpoint:
    """What a checkpoint's quantization config says about its int4 tensors."""

    method: str  # "gptq" or "awq"
    group_size: int  # -1: one group per row
    zero_plus_one: bool  # GPTQ's original format: stored zeros are one less than the zeros

    @property
    def name(self) -> str:
        return f"{self.method.upper()} int4 g{self.group_size}"


def checkpoint_quantization(folder: Path) -> Int4Checkpoint | None:
    """The folder's int4 format (None: not a GPTQ/AWQ checkpoint); refuses what cannot be run."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    qc = config.get("quantization_config")
    source = "config.json quantization_config"
    if qc is None and (folder / "quantize_config.json").is_file():
        qc, source = json.loads((folder / "quantize_config.json").read_text()), "quantize_config.json"
        qc.setdefault("quant_method", "gptq")  # AutoGPTQ's file, which predates the field
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise ModelLoadError(f"{folder}: {source} has quant_method {method!r}; edgepaged loads gptq and awq (int4), or float weights")
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if bits != 4:
        raise ModelLoadError(f"{folder}: {source} says {bits}-bit {method}; only 4-bit GPTQ/AWQ checkpoints load")
    if not isinstance(group, int) or not (group == -1 or group > 0 and group % 32 == 0):
        raise ModelLoadError(f"{folder}: {source} group_size {group!r}: expected -1 or a multiple of 32")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelLoadError(f"{folder}: AWQ version {version!r} packs differently; only the GEMM version loads")
        if not qc.get("zero_point", True):
            raise ModelLoadError(f"{folder}: AWQ without zero points is not supported")
        return Int4Checkpoint("awq", group, zero_plus_one=False)
    if qc.get("desc_act", False) and not qc.get("static_groups", False):
        raise ModelLoadError(
            f"{folder}: GPTQ with desc_act=True (act-order) stores its groups in a permuted order (g_idx), which the "
            "int4 kernels cannot run; re-quantize with desc_act=False, or load a GGUF or float checkpoint"
        )
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"{folder}: GPTQ checkpoint_format {fmt!r}: expected gptq or gptq_v2")
    return Int4Checkpoint("gptq", group, zero_plus_one=fmt == "gptq")


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., W] -> uint8 [..., W, 8]: nibble i of each word (bits 4i..4i+3) at index i."""
    return ((words.view(np.uint32)[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def unpack_gptq_rows(qweight: np.ndarray) -> np.ndarray:
    """GPTQ qweight int32 [K/8, N] -> uint8 [K, N]: k = 8r + i from nibble i of word (r, n)."""
    r, n = qweight.shape
    return _nibbles(qweight).transpose(0, 2, 1).reshape(r * 8, n)


def unpack_gptq_columns(packed: np.ndarray) -> np.ndarray:
    """GPTQ qzeros int32 [R, N/8] -> uint8 [R, N]: column 8c + i from nibble i of word c."""
    return _nibbles(packed).reshape(packed.shape[0], -1)


def unpack_awq_columns(packed: np.ndarray) -> np.ndarray:
    """AWQ qweight/qzeros int32 [R, N/8] -> uint8 [R, N]: column 8c + AWQ_ORDER[i] from nibble i of word c."""
    nibbles = _nibbles(packed)
    out = np.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return out.reshape(packed.shape[0], -1)


def _loaded_group(fmt: Int4Checkpoint, k: int) -> int:
    """The group size a layer with K inputs is loaded with: groups over 128 that 128 divides are cut to 128."""
    group = k if fmt.group_size == -1 else fmt.group_size
    return _KERNEL_GROUP if group > _KERNEL_GROUP and group % _KERNEL_GROUP == 0 else group


def int4_weight(fmt: Int4Checkpoint, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                g_idx: np.ndarray | None = None, name: str = "") -> Int4Weight:
    """One layer's tensors (as stored) -> the shared layout, [N, K] with groups of <= 128."""
    if fmt.method == "gptq":
        q, zeros = unpack_gptq_rows(qweight), unpack_gptq_columns(qzeros)  # [K, N], [K/G, N]
    else:
        q, zeros = unpack_awq_columns(qweight), unpack_awq_columns(qzeros)
    k, n = q.shape
    group = k if fmt.group_size == -1 else fmt.group_size
    if k % group or scales.shape != (k // group, n) or zeros.shape != scales.shape:
        raise ModelLoadError(f"{name}: qweight {qweight.shape}, qzeros {qzeros.shape} and scales {scales.shape} do not fit "
                             f"{fmt.name}")
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // group):
        raise ModelLoadError(f"{name}: g_idx is not k // group_size (an act-order checkpoint); the int4 kernels cannot run it")
    s = scales.astype(np.float32)
    z = zeros.astype(np.float32) + (1 if fmt.zero_plus_one else 0)
    offsets = -z * s
    if _loaded_group(fmt, k) != group:  # the same weights in groups every kernel takes
        s, offsets = (np.repeat(t, group // _KERNEL_GROUP, axis=0) for t in (s, offsets))
        group = _KERNEL_GROUP
    return Int4Weight(
        pack_nibbles(np.ascontiguousarray(q.T)),
        torch.from_numpy(np.ascontiguousarray(s.T).astype(np.float16)),
        torch.from_numpy(np.ascontiguousarray(offsets.T).astype(np.float16)),
        group,
    )


def read_int4_checkpoint(folder: Path, fmt: Int4Checkpoint, keep_quantized: bool = True,
                         ) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """Every tensor of the folder's safetensors under its Hugging Face name: each quantized
    layer's parts as one `prefix.weight` Int4Weight (float32 [N, K] when not `keep_quantized`),
    everything else as stored."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="np") as f:
            names = set(f.keys())
            layers = sorted(n.removesuffix(".qweight") for n in names if n.endswith(".qweight"))
            packed = {f"{p}.{part}" for p in layers for part in _PACKED_PARTS}
            for prefix in layers:
                try:
                    parts = {part: f.get_tensor(f"{prefix}.{part}") for part in ("qweight", "qzeros", "scales")}
                except Exception as exc:  # safetensors raises its own error type for a missing name
                    raise ModelLoadError(f"{file.name}: {prefix} has a qweight but not its qzeros and scales ({exc})") from exc
                g_idx = f.get_tensor(f"{prefix}.g_idx") if f"{prefix}.g_idx" in names else None
                weight = int4_weight(fmt, **parts, g_idx=g_idx, name=f"{file.name}: {prefix}")
                yield f"{prefix}.weight", weight if keep_quantized else weight.dequantize()
        with safe_open(str(file), framework="pt") as f:  # float tensors as torch: numpy has no bfloat16
            for name in sorted(names - packed):
                yield name, f.get_tensor(name)


def int4_checkpoint_bytes(folder: Path, fmt: Int4Checkpoint, float_bytes: int) -> int:
    """Bytes the folder's weights take once loaded (from the headers only): each quantized layer
    in the shared layout (groups of <= 128), every other float tensor at `float_bytes`."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for name in names:
                shape = f.get_slice(name).get_shape()
                if name.endswith(".qweight"):
                    k, n = (shape[0] * 8, shape[1]) if fmt.method == "gptq" else (shape[0], shape[1] * 8)
                    total += n * k // 2 + n * (k // _loaded_group(fmt, k)) * 4
                elif not name.endswith(tuple(f".{p}" for p in _PACKED_PARTS)) and f.get_slice(name).get_dtype().startswith(("F", "BF")):
                    total += int(np.prod(shape)) * float_bytes
    return total

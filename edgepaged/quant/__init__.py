"""Quantized weights kept quantized: the packed layouts (formats), the GGUF reader that fills
them (gguf), and the device forms behind one linear/embedding interface (linear, cpu)."""

from .formats import Int4Weight, Int8Weight, PackedWeight, cat_rows
from .gguf import GGUFFile, packed_nbytes
from .linear import ConcatWeight, device_weight, fused_weight, is_packed

__all__ = [
    "ConcatWeight",
    "GGUFFile",
    "Int4Weight",
    "Int8Weight",
    "PackedWeight",
    "cat_rows",
    "device_weight",
    "fused_weight",
    "is_packed",
    "packed_nbytes",
]

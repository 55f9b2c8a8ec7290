"""The TensorRT backend: export to ONNX, build a cached engine with our paged-attention plugins, run it.

Modules, in the order data flows: `export` (our decoder as an ONNX graph whose attention is one
`edgepaged::paged_attention` node per layer), `plugin` (the TensorRT plugins that carry our Triton
kernels' PTX), `build` (the engine, cached per model, profile, TensorRT version and GPU),
`runtime` (the engine driven by the scheduler like any other backend), and `ort_reference` (the
same graph run in onnxruntime on CPU, which is how the export is verified without a GPU).

This module only answers whether TensorRT is usable here and, if not, what to do about it; it
imports nothing heavy, so `edgepaged doctor` can ask on any machine.
"""

from __future__ import annotations

import ctypes
import importlib
import re
from pathlib import Path
from types import ModuleType
from typing import Callable

from ...errors import EdgepagedError

# The first release whose plugin API takes an ahead-of-time implementation (`tensorrt.plugin.aot_impl`),
# which is what lets the engine run our kernels without Python.
MIN_TENSORRT_VERSION = (10, 9)

_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


class TensorRTUnavailable(EdgepagedError, RuntimeError):
    """TensorRT is missing or too old here; the message says how to get a usable one."""


def parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric fields of a version string: "10.13.0.35" -> (10, 13, 0, 35)."""
    parts = []
    for field in text.split("."):
        digits = re.match(r"\d+", field)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(field):  # "0a1": a pre-release tag ends the numeric part
            break
    return tuple(parts)


def is_jetson(tegra_release: Path = _TEGRA_RELEASE) -> bool:
    return tegra_release.is_file()


def install_hint(jetson: bool) -> str:
    """How to get TensorRT >= MIN_TENSORRT_VERSION on this kind of box."""
    need = ".".join(map(str, MIN_TENSORRT_VERSION))
    if jetson:
        return (
            f"on a Jetson, TensorRT comes with JetPack (its python3-libnvinfer package); edgepaged needs "
            f"TensorRT >= {need}, which JetPack 6.x (TensorRT 10.3) does not have: flash a JetPack whose "
            f"TensorRT is >= {need} (JetPack 7 ships 10.13), or use --backend triton"
        )
    return (
        f'on an RTX or datacenter GPU: pip install "tensorrt>={need}" (the PyPI package fetches the '
        f"libraries from NVIDIA's package index, https://pypi.nvidia.com, at install time), or use --backend triton"
    )


def import_tensorrt(importer: Callable[[str], ModuleType] = importlib.import_module, jetson: bool | None = None) -> ModuleType:
    """The `tensorrt` module if it is installed and new enough; otherwise TensorRTUnavailable."""
    jetson = is_jetson() if jetson is None else jetson
    try:
        trt = importer("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {install_hint(jetson)}") from None
    version = getattr(trt, "__version__", "")
    if parse_version(version)[:2] < MIN_TENSORRT_VERSION:
        raise TensorRTUnavailable(
            f"TensorRT {version or '(unknown version)'} is too old: the paged-attention plugin needs "
            f"ahead-of-time plugin kernels (tensorrt.plugin.aot_impl, TensorRT >= "
            f"{'.'.join(map(str, MIN_TENSORRT_VERSION))}); {install_hint(jetson)}"
        )
    return trt


def cuda_driver_version() -> str | None:
    """The CUDA version the installed driver supports ("12.6"), or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"

"""`edgepaged doctor`: what this machine has, and which attention backends can run on it.

Each probe is independent and never raises: a missing package or driver is a finding, with what
to do about it. The probes read only what is installed; nothing is built or downloaded.
"""

from __future__ import annotations

import importlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import typer

_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(slots=True)
class Finding:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Machine:
    """Where the probes look (tests replace any of it)."""

    importer: Callable[[str], ModuleType] = importlib.import_module
    nvidia_driver: Path = _NVIDIA_DRIVER
    tegra_release: Path = _TEGRA_RELEASE
    cuda_driver_version: Callable[[], str | None] | None = None


def _module(machine: Machine, name: str) -> ModuleType | None:
    try:
        return machine.importer(name)
    except ImportError:
        return None


def _first_line(path: Path) -> str | None:
    try:
        return path.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def _driver_version(path: Path) -> str | None:
    """"560.35.03" from /proc/driver/nvidia/version's "NVRM version: ... Kernel Module  560.35.03  ..."."""
    line = _first_line(path)
    if line and "Kernel Module" in line:
        return line.split("Kernel Module")[1].split()[0]
    return line


def collect(machine: Machine | None = None) -> list[Finding]:
    """Every finding, in the order a person reads them; the last says which backends can run."""
    from ..backends.tensorrt import MIN_TENSORRT_VERSION, TensorRTUnavailable, cuda_driver_version, import_tensorrt

    machine = machine or Machine()
    findings = [Finding("python", True, f"{platform.python_version()} on {platform.machine()}")]
    jetson = _first_line(machine.tegra_release)
    if jetson:
        findings.append(Finding("jetson", True, f"L4T {jetson.removeprefix('# ')}"))

    torch = _module(machine, "torch")
    cuda = bool(torch is not None and torch.cuda.is_available())
    if torch is None:
        findings.append(Finding("torch", False, "not installed: run scripts/install.sh"))
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        findings.append(Finding("torch", True, f"{torch.__version__} ({build})"))
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            memory = "unified memory" if p.is_integrated else f"{p.total_memory / 2**30:.1f} GiB"
            findings.append(Finding(f"gpu {i}", True, f"{p.name}, compute capability {p.major}.{p.minor}, {memory}"))
    else:
        findings.append(Finding("gpu", False, "no CUDA GPU visible to torch: only the torch backend can run"))

    driver = _driver_version(machine.nvidia_driver)
    cuda_api = (machine.cuda_driver_version or cuda_driver_version)()
    if driver or cuda_api:
        parts = [f"NVIDIA {driver}" if driver else None, f"supports CUDA {cuda_api}" if cuda_api else None]
        findings.append(Finding("driver", True, ", ".join(p for p in parts if p)))
    else:
        findings.append(Finding("driver", False, "no NVIDIA driver found (libcuda.so.1)"))

    triton = _module(machine, "triton")
    triton_detail = triton.__version__ if triton else 'not installed: pip install "edgepaged[gpu]"'
    findings.append(Finding("triton", triton is not None, triton_detail))

    try:
        trt = import_tensorrt(machine.importer, jetson=jetson is not None)
        findings.append(Finding("tensorrt", True, trt.__version__))
    except TensorRTUnavailable as exc:
        trt = None
        findings.append(Finding("tensorrt", False, str(exc)))

    onnx_ok = _module(machine, "onnx") is not None
    findings.append(Finding("onnx", onnx_ok, "export available" if onnx_ok else 'not installed: pip install "edgepaged[trt]"'))

    backends = ["torch"]
    missing = []
    if cuda and triton is not None:
        backends.append("triton")
    else:
        missing.append("triton (needs a CUDA GPU and triton)")
    if cuda and triton is not None and trt is not None and onnx_ok:
        backends.append("tensorrt")
    else:
        need = ".".join(map(str, MIN_TENSORRT_VERSION))
        missing.append(f"tensorrt (needs a CUDA GPU, TensorRT >= {need}, triton and onnx)")
    detail = ", ".join(backends) + (f"; not here: {'; '.join(missing)}" if missing else "")
    findings.append(Finding("backends", True, detail))
    return findings


def doctor(as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON.")) -> None:
    """Report the GPU, driver, CUDA, TensorRT and Triton here, and which backends can run."""
    findings = collect()
    if as_json:
        typer.echo(json.dumps([asdict(f) for f in findings], indent=2))
        return
    width = max(len(f.name) for f in findings)
    for f in findings:
        mark = typer.style("ok ", fg=typer.colors.GREEN) if f.ok else typer.style("-- ", fg=typer.colors.YELLOW)
        typer.echo(f"{mark}{f.name:<{width}}  {f.detail}")

"""What the device really has now, read from the source that tells the truth on each kind.

A discrete GPU's driver knows its free memory. On unified memory (Jetson) the driver's free
figure counts the page cache as used, so it under-reports what could be had; the OS's
MemAvailable is right, less what the profile leaves to the OS. Whether memory is unified is read
from the platform, never taken from the profile alone: a Jetson profile on a desktop card must
not make the probe read /proc/meminfo for GPU memory.

Every reader is injectable (file paths, driver calls), so tests can play any box on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..profiles import GIB, DeviceProfile

# A real device matches a profile when its total memory is this close to the profile's figure
# (drivers and kernels report less than the marketing number: 79.6 GiB for an "80 GB" H100,
# about 3.4 GiB of MemTotal on a 4 GB Orin Nano after its carveouts).
_MATCH_TOLERANCE = 0.2


@dataclass(slots=True, frozen=True)
class DeviceFacts:
    """Memory figures of one device at one moment.

    `available_bytes` is what could still be taken; on unified memory the OS reserve is already
    subtracted. `process_bytes` is what this process already holds on the device and the
    available figure has therefore already lost, so a plan made after loading the weights gets
    the same budget as one made before.
    """

    total_bytes: int
    available_bytes: int
    unified: bool
    source: str
    process_bytes: int = 0


@dataclass(slots=True, frozen=True)
class HostPaths:
    """The platform files the probe reads (tests point these at fakes)."""

    meminfo: Path = Path("/proc/meminfo")
    self_status: Path = Path("/proc/self/status")
    tegra_release: Path = Path("/etc/nv_tegra_release")
    dt_compatible: Path = Path("/proc/device-tree/compatible")


def _is_integrated(device: torch.device) -> bool:
    return bool(torch.cuda.get_device_properties(device).is_integrated)


def _set_fraction(fraction: float, device: torch.device) -> None:
    # torch wants an index here; a bare "cuda" means the current device.
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)


@dataclass(slots=True, frozen=True)
class CudaDriver:
    """The CUDA calls the probe and the enforcer make (tests substitute fakes)."""

    mem_get_info: Callable[[torch.device], tuple[int, int]] = torch.cuda.mem_get_info
    is_integrated: Callable[[torch.device], bool] = _is_integrated
    reserved_bytes: Callable[[torch.device], int] = torch.cuda.memory_reserved
    device_name: Callable[[torch.device], str] = torch.cuda.get_device_name
    is_available: Callable[[], bool] = torch.cuda.is_available
    set_memory_fraction: Callable[[float, torch.device], None] = _set_fraction


def read_meminfo(path: Path) -> dict[str, int]:
    """The numeric fields of a /proc/meminfo-style file (also /proc/self/status), in bytes."""
    fields = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if parts[1:] == ["kB"] else 1
        fields[key.strip()] = int(parts[0]) * scale
    return fields


def is_tegra(paths: HostPaths) -> bool:
    """A Jetson (Tegra SoC): L4T's release file, or "nvidia,tegra" in the device tree."""
    if paths.tegra_release.is_file():
        return True
    try:
        return b"nvidia,tegra" in paths.dt_compatible.read_bytes()
    except OSError:
        return False


def is_unified_cuda(device: torch.device, paths: HostPaths, cuda: CudaDriver) -> bool:
    """A CUDA device whose memory is the host's (Jetson, or any GPU the driver calls integrated)."""
    return is_tegra(paths) or cuda.is_integrated(device)


def _host_memory(paths: HostPaths) -> tuple[int, int, int, str]:
    """(total, available, this process's anonymous memory, source) from the OS."""
    if paths.meminfo.is_file():
        info = read_meminfo(paths.meminfo)
        if "MemAvailable" not in info:
            raise RuntimeError(f"{paths.meminfo} has no MemAvailable (Linux 3.14+ needed)")
        own = read_meminfo(paths.self_status).get("RssAnon", 0) if paths.self_status.is_file() else 0
        return info["MemTotal"], info["MemAvailable"], own, f"{paths.meminfo} MemAvailable"
    vm = psutil.virtual_memory()  # not Linux: psutil's notion of available memory
    return vm.total, vm.available, psutil.Process().memory_info().rss, "psutil available memory"


def probe_device(
    profile: DeviceProfile,
    device: torch.device,
    *,
    paths: HostPaths = HostPaths(),
    cuda: CudaDriver = CudaDriver(),
) -> DeviceFacts:
    """Memory facts of `device` now; the profile only supplies the OS reserve (or asks to emulate)."""
    device = torch.device(device)
    reserve = int(profile.budget.os_reserve_gb * GIB)
    if profile.device.emulate:
        where = cuda.device_name(device) if device.type == "cuda" else "cpu"
        return facts_from_profile(profile, source=f"emulated from profile {profile.name} on {where}")
    if device.type == "cpu":
        total, available, own, source = _host_memory(paths)
        return DeviceFacts(total, max(available - reserve, 0), True, f"cpu: {source}", own)
    if device.type != "cuda":
        raise ValueError(f"cannot probe memory of a {device.type} device; edgepaged runs on cpu or cuda")
    name = cuda.device_name(device)
    allocator = cuda.reserved_bytes(device)
    if is_unified_cuda(device, paths, cuda):
        # Allocator memory only: host-side usage may or may not show in RssAnon under nvmap, and
        # counting it twice would plan past the budget; leaving it out only plans smaller.
        total, available, _, source = _host_memory(paths)
        return DeviceFacts(total, max(available - reserve, 0), True, f"{name} (unified): {source}", allocator)
    free, total = cuda.mem_get_info(device)
    return DeviceFacts(total, free, False, f"{name}: driver free/total", allocator)


def facts_from_profile(profile: DeviceProfile, source: str = "profile figures (no such device here)") -> DeviceFacts:
    """The facts the profile's own figures describe: a fresh box with nothing but the OS on it."""
    total = int(profile.device.total_memory_gb * GIB)
    reserve = int(profile.budget.os_reserve_gb * GIB)
    return DeviceFacts(total, total - reserve, profile.device.unified_memory, source)


def device_matches(
    profile: DeviceProfile,
    *,
    paths: HostPaths = HostPaths(),
    cuda: CudaDriver = CudaDriver(),
) -> bool:
    """Whether this machine has the device the profile describes (or the profile asks to emulate it).

    A cpu profile always matches. A cuda profile needs a CUDA device of the same memory kind
    (unified or not) and about the profile's total memory, so an RTX profile on an H100 is not
    measured as if the H100 were that card.
    """
    if profile.device.kind == "cpu":
        return True
    if not cuda.is_available():
        return False
    if profile.device.emulate:
        return True
    device = torch.device("cuda")
    if is_unified_cuda(device, paths, cuda) != profile.device.unified_memory:
        return False
    facts = probe_device(profile, device, paths=paths, cuda=cuda)
    expected = profile.device.total_memory_gb * GIB
    return abs(facts.total_bytes - expected) <= _MATCH_TOLERANCE * expected

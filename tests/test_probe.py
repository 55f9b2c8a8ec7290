"""The probe on fake platforms (a Jetson, a desktop card, a CPU box) and the allocator cap."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from edgepaged.memory.enforce import cap_process_memory
from edgepaged.memory.planner import plan_memory
from edgepaged.memory.probe import (
    CudaDriver,
    DeviceFacts,
    HostPaths,
    device_matches,
    facts_from_profile,
    is_tegra,
    probe_device,
    read_meminfo,
)
from edgepaged.profiles import GIB, load_profile

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
KB = 1024

MEMINFO = """\
MemTotal:        7620000 kB
MemFree:          420000 kB
MemAvailable:    5120000 kB
Buffers:           81000 kB
Cached:          3900000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

STATUS = """\
Name:\tpython
State:\tR (running)
VmRSS:\t  900000 kB
RssAnon:\t  700000 kB
RssFile:\t  200000 kB
"""


def host(tmp_path: Path, *, tegra_release: bool = False, compatible: bytes | None = None, meminfo: str | None = MEMINFO) -> HostPaths:
    paths = HostPaths(
        meminfo=tmp_path / "meminfo",
        self_status=tmp_path / "status",
        tegra_release=tmp_path / "nv_tegra_release",
        dt_compatible=tmp_path / "compatible",
    )
    if meminfo is not None:
        paths.meminfo.write_text(meminfo)
    paths.self_status.write_text(STATUS)
    if tegra_release:
        paths.tegra_release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    if compatible is not None:
        paths.dt_compatible.write_bytes(compatible)
    return paths


def _never(*_):
    raise AssertionError("the probe must not ask the driver for free memory on unified memory")


def driver(*, free: int = 0, total: int = 0, integrated: bool = False, reserved: int = 0, set_fraction=None) -> CudaDriver:
    return CudaDriver(
        mem_get_info=(lambda _d: (free, total)) if total else _never,
        is_integrated=lambda _d: integrated,
        reserved_bytes=lambda _d: reserved,
        device_name=lambda _d: "Fake GPU",
        is_available=lambda: True,
        set_memory_fraction=set_fraction or (lambda *_: pytest.fail("no cap expected")),
    )


def test_read_meminfo_converts_kb_and_skips_text_fields(tmp_path):
    paths = host(tmp_path)
    info = read_meminfo(paths.meminfo)
    assert info["MemAvailable"] == 5120000 * KB
    assert info["HugePages_Total"] == 0
    status = read_meminfo(paths.self_status)
    assert status["RssAnon"] == 700000 * KB and "Name" not in status and "State" not in status


@pytest.mark.parametrize(
    "release, compatible, expected",
    [
        (True, None, True),
        (False, b"nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00", True),
        (False, b"raspberrypi,5-model-b\x00brcm,bcm2712\x00", False),
        (False, None, False),
    ],
)
def test_tegra_is_detected_from_the_platform(tmp_path, release, compatible, expected):
    assert is_tegra(host(tmp_path, tegra_release=release, compatible=compatible)) is expected


def test_cpu_reads_mem_available_less_the_reserve(tmp_path):
    profile = load_profile("cpu")
    facts = probe_device(profile, CPU, paths=host(tmp_path))
    assert facts.total_bytes == 7620000 * KB
    assert facts.available_bytes == 5120000 * KB - int(profile.budget.os_reserve_gb * GIB)
    assert facts.process_bytes == 700000 * KB  # anonymous memory only: mapped libraries are the page cache's
    assert facts.unified and "MemAvailable" in facts.source


def test_jetson_reads_mem_available_never_the_driver(tmp_path):
    profile = load_profile("jetson-orin-nano-8gb")
    paths = host(tmp_path, compatible=b"nvidia,p3768-0000+p3767-0005\x00nvidia,tegra234\x00")
    facts = probe_device(profile, CUDA, paths=paths, cuda=driver(reserved=300 << 20))
    assert facts.unified
    assert facts.total_bytes == 7620000 * KB
    assert facts.available_bytes == 5120000 * KB - int(1.5 * GIB)
    assert facts.process_bytes == 300 << 20
    assert "Fake GPU (unified)" in facts.source


def test_an_integrated_gpu_is_unified_even_without_tegra_files(tmp_path):
    facts = probe_device(load_profile("jetson-orin-nano-8gb"), CUDA, paths=host(tmp_path), cuda=driver(integrated=True))
    assert facts.unified and facts.available_bytes == 5120000 * KB - int(1.5 * GIB)


def test_discrete_gpu_reads_the_driver_even_under_a_unified_profile(tmp_path):
    # A Jetson profile on a desktop card: the platform decides, and the OS reserve does not apply.
    fake = driver(free=70 * GIB, total=80 * GIB, reserved=2 * GIB)
    facts = probe_device(load_profile("jetson-orin-nano-8gb"), CUDA, paths=host(tmp_path), cuda=fake)
    assert facts == DeviceFacts(80 * GIB, 70 * GIB, False, "Fake GPU: driver free/total", 2 * GIB)


def test_emulation_uses_the_profile_figures_on_any_device(tmp_path):
    profile = load_profile("jetson-orin-nano-8gb").model_copy(
        update={"device": load_profile("jetson-orin-nano-8gb").device.model_copy(update={"emulate": True})}
    )
    facts = probe_device(profile, CUDA, paths=host(tmp_path), cuda=driver(free=70 * GIB, total=80 * GIB))
    assert (facts.total_bytes, facts.available_bytes, facts.unified) == (8 * GIB, int(6.5 * GIB), True)
    assert facts.source == "emulated from profile jetson-orin-nano-8gb on Fake GPU"
    assert facts_from_profile(load_profile("rtx-4060-8gb")) == DeviceFacts(8 * GIB, 8 * GIB, False, "profile figures (no such device here)")


def test_without_proc_meminfo_the_probe_asks_psutil(tmp_path):
    facts = probe_device(load_profile("cpu"), CPU, paths=host(tmp_path, meminfo=None))
    assert facts.total_bytes == psutil.virtual_memory().total
    assert facts.source == "cpu: psutil available memory"
    assert facts.process_bytes > 0


def test_meminfo_without_mem_available_is_an_error(tmp_path):
    paths = host(tmp_path, meminfo="MemTotal: 1000 kB\nMemFree: 10 kB\n")
    with pytest.raises(RuntimeError, match="has no MemAvailable"):
        probe_device(load_profile("cpu"), CPU, paths=paths)


def test_device_matches_by_memory_kind_and_size(tmp_path):
    h100 = driver(free=78 * GIB, total=int(79.6 * GIB))
    paths = host(tmp_path)
    assert device_matches(load_profile("cpu"), paths=paths, cuda=h100)
    assert device_matches(load_profile("h100-80gb"), paths=paths, cuda=h100)
    assert not device_matches(load_profile("h200-141gb"), paths=paths, cuda=h100)
    assert not device_matches(load_profile("rtx-4060-8gb"), paths=paths, cuda=h100)
    assert not device_matches(load_profile("jetson-agx-orin-64gb"), paths=paths, cuda=h100)
    no_gpu = CudaDriver(is_available=lambda: False)
    assert not device_matches(load_profile("h100-80gb"), paths=paths, cuda=no_gpu)


def test_device_matches_a_jetson_by_its_meminfo(tmp_path):
    paths = host(tmp_path, tegra_release=True)  # MemTotal 7.3 GiB, as an 8 GB Orin Nano reports
    assert device_matches(load_profile("jetson-orin-nano-8gb"), paths=paths, cuda=driver())
    assert not device_matches(load_profile("jetson-orin-nano-4gb"), paths=paths, cuda=driver())
    assert not device_matches(load_profile("rtx-4060-8gb"), paths=paths, cuda=driver())


def plan_for(profile_name: str, facts: DeviceFacts):
    return plan_memory(
        load_profile(profile_name),
        facts,
        weights_bytes=GIB,
        activation_bytes=GIB // 2,
        overhead_bytes=GIB // 2,
        kv_bytes_per_token=32 * 1024,
    )


def test_cap_on_a_discrete_gpu_leaves_the_overhead_outside_the_allocator(tmp_path):
    calls = []
    fake = driver(free=79 * GIB, total=80 * GIB, set_fraction=lambda fraction, dev: calls.append((fraction, dev)))
    plan = plan_for("h100-80gb", DeviceFacts(80 * GIB, 79 * GIB, False, "fake"))
    assert cap_process_memory(plan, CUDA, paths=host(tmp_path), cuda=fake) is True
    assert calls == [((plan.budget_bytes - GIB // 2) / (80 * GIB), CUDA)]
    assert calls[0][0] == pytest.approx(0.9 - 0.5 / 80)


def test_cap_is_a_no_op_on_cpu_and_unified_memory(tmp_path):
    plan = plan_for("jetson-orin-nano-8gb", DeviceFacts(8 * GIB, 6 * GIB, True, "fake"))
    assert cap_process_memory(plan, CPU, paths=host(tmp_path), cuda=driver()) is False
    assert cap_process_memory(plan, CUDA, paths=host(tmp_path, tegra_release=True), cuda=driver()) is False


def test_cap_refuses_a_budget_larger_than_the_card(tmp_path):
    # An emulated 80 GB plan on a 24 GB card cannot be expressed as a fraction of it.
    plan = plan_for("h100-80gb", DeviceFacts(80 * GIB, 79 * GIB, False, "emulated"))
    with pytest.raises(ValueError, match="cannot cap the allocator"):
        cap_process_memory(plan, CUDA, paths=host(tmp_path), cuda=driver(free=23 * GIB, total=24 * GIB))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_and_cap_on_the_real_gpu():
    free, total = torch.cuda.mem_get_info()
    profile = load_profile("h100-80gb")
    facts = probe_device(profile, CUDA)
    assert facts.total_bytes == total and not facts.unified
    assert abs(facts.available_bytes - free) < GIB
    plan = plan_for("h100-80gb", DeviceFacts(total, free, False, "real"))
    try:
        assert cap_process_memory(plan, CUDA)
        allowed = plan.budget_bytes - plan.overhead_bytes
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(allowed + GIB, dtype=torch.uint8, device=CUDA)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)

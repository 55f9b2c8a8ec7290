"""The profile a command plans with, checked against the device that is really here.

A profile written for another device is a common mistake with a quiet failure: the memory plan
then comes from this machine (a Jetson profile on an H200 plans a 105 GiB budget). It is not an
error, since benchmarking a small box on a big card is legitimate, so the command says what it
does and how to plan as on the profile's device instead (`--emulate`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..profiles import DeviceProfile


def profile_here(name_or_path: str | Path, emulate: bool, warn: Callable[[str], None]) -> DeviceProfile:
    """The profile, made to emulate its device when asked; `warn` hears of a device mismatch."""
    import torch

    from ..memory.probe import device_matches
    from ..profiles import load_profile

    profile = load_profile(name_or_path)
    if emulate:
        return profile.model_copy(update={"device": profile.device.model_copy(update={"emulate": True})})
    cuda_here = torch.cuda.is_available()
    if profile.device.kind == "cuda" and not cuda_here:
        return profile  # the engine refuses it with the reason; there is nothing to plan on
    if not device_matches(profile):
        device = profile.device
        memory = "unified" if device.unified_memory else "discrete"
        here = (
            f"{torch.cuda.get_device_name()} with {torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB"
            if cuda_here and device.kind == "cuda"
            else "no such device"
        )
        warn(
            f"profile {profile.name} describes a {device.kind} device with {device.total_memory_gb:g} GiB of "
            f"{memory} memory, but this machine has {here}: the memory plan uses this machine's memory. "
            f"To plan as on the profile's device (budget and figures from the profile, allocator capped "
            f"to them), add --emulate."
        )
    return profile

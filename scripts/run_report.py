"""What every benchmark and check report says about its run, and how its files are named.

Shared by the scripts beside it (they put this folder on sys.path by being run from it), so
every report names the card the same way and records the same facts about the run.
"""

from __future__ import annotations

import re
import shlex
import sys
from datetime import datetime, timezone


def card_slug(device_name: str) -> str:
    """A short file-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    name = re.sub(r"\b(nvidia|geforce)\b", "", device_name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def gpu_run_facts() -> dict:
    """The card, the time, the exact command and the versions that shaped a GPU run."""
    import torch
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }

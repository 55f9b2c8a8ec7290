"""systemd service integration: the notify protocol and the watchdog, with no libsystemd.

The protocol is one datagram per state change sent to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading "@" means the abstract namespace). Writing it by hand keeps the box
free of a C dependency and makes every message observable in tests by binding that socket.
Outside systemd the variable is unset and every call here is a no-op, so the same binary runs
under a terminal, a container or a unit.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Callable

from edgepaged.profiles import DeviceProfile

# Host memory the process holds outside the profile's budget (which already covers weights, KV,
# activations and the CUDA context): the interpreter, torch and transformers, the tokenizer,
# HTTP buffers.
RUNTIME_OVERHEAD_GIB = 1.0


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not run under a notify-aware manager.

    A failed send is reported, not raised: losing a status line must never take the server
    down, and systemd itself treats a missing READY=1 as a start timeout, which is the right
    failure for the case that matters.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def notify_ready(status: str) -> bool:
    """Tell systemd the model is loaded and warmed up, so dependent units may start."""
    return notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")


def notify_stopping(status: str) -> bool:
    """Tell systemd a graceful stop has begun, so it waits for the drain instead of a restart."""
    return notify(f"STOPPING=1\nSTATUS={status}")


def watchdog_period() -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when no watchdog is set.

    WATCHDOG_PID names the process the watchdog is meant for; a child that inherited the
    environment (a worker, a test subprocess) must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Watchdog:
    """A daemon thread that sends WATCHDOG=1 every period while `healthy()` holds.

    It pings from its own thread, not the event loop, so a long model load before the loop
    exists is covered too; `healthy` is what makes the ping mean something: once the engine
    loop dies or stalls the pings stop and systemd restarts the service (Restart=on-failure).
    """

    def __init__(self, period: float, healthy: Callable[[], bool]):
        self.period = period
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepaged-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._healthy():
                notify("WATCHDOG=1")
            self._stop.wait(self.period)


def memory_max(profile: DeviceProfile) -> str:
    """The unit's MemoryMax= for a profile: its memory budget plus the runtime's overhead.

    The budget is the smallest of the profile's limits (fraction of the device, absolute cap,
    what the OS keeps). On unified memory (Jetson, CPU) the budget is system RAM, so the cgroup
    cap is the budget itself; on a discrete card host RAM holds at most a staging copy of the
    weights, which the budget also bounds. Past it the kernel kills the service and systemd
    restarts it, instead of the whole box swapping to a halt.
    """
    budget, total = profile.budget, profile.device.total_memory_gb
    limit = min(budget.fraction * total, budget.max_gb or total, total - budget.os_reserve_gb)
    return f"{math.ceil((limit + RUNTIME_OVERHEAD_GIB) * 1024)}M"

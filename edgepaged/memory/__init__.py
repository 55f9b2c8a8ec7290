"""Device memory: what the device has (probe), how the budget is spent (planner), and the cap
that holds the process to it (enforce)."""

from .enforce import cap_process_memory
from .planner import MemoryPlan, MemoryPlanError, plan_memory
from .probe import DeviceFacts, probe_device

__all__ = ["DeviceFacts", "MemoryPlan", "MemoryPlanError", "cap_process_memory", "plan_memory", "probe_device"]

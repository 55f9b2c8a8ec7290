"""Make the plan binding: on a discrete GPU the allocator itself refuses to grow past the budget.

The KV pool is allocated once from the plan, so a well-behaved engine stays inside its budget by
construction; the cap is for the bug that does not (a leak, an unplanned workspace), which
should fail loudly with an out-of-memory error instead of quietly taking the memory of
whatever else runs on the card. Unified memory has no per-process cap to set: there the
budget is upheld by the plan alone.
"""

from __future__ import annotations

import torch

from .planner import MemoryPlan
from .probe import CudaDriver, HostPaths, is_unified_cuda


def cap_process_memory(
    plan: MemoryPlan,
    device: torch.device,
    *,
    paths: HostPaths = HostPaths(),
    cuda: CudaDriver = CudaDriver(),
) -> bool:
    """Cap torch's caching allocator on a discrete CUDA device; True when a cap was set.

    The allocator gets the budget less the plan's overhead, which lives outside the allocator
    (CUDA context, library handles), so allocator plus overhead stays within the budget.
    """
    device = torch.device(device)
    if device.type != "cuda" or is_unified_cuda(device, paths, cuda):
        return False
    _, total = cuda.mem_get_info(device)
    allowed = plan.budget_bytes - plan.overhead_bytes
    if not 0 < allowed <= total:
        raise ValueError(
            f"cannot cap the allocator to {allowed} bytes (budget {plan.budget_bytes} less overhead "
            f"{plan.overhead_bytes}) on a device of {total} bytes"
        )
    cuda.set_memory_fraction(allowed / total, device)
    return True

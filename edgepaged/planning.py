"""Measure a loaded model on its device and size the KV pool from the profile's budget.

The profile run and the trial graph capture happen here, before the pool exists, so the plan
leaves room for everything the engine will hold besides the pool. What they measure (the
activation peak and the runtime overhead) depends only on the model's shape, the profile, the
engine's limits and the software, so it is kept on disk under that key
(`memory.plan_cache`): a second start skips the profile run, which on a small box is seconds.
The device's free memory is probed afresh every time.
"""

from __future__ import annotations

import logging
import threading

import psutil
import torch

from .config import EngineConfig
from .memory.plan_cache import MeasuredParts, PlanCache, PlanKey
from .memory.planner import MemoryPlan, kv_token_bytes, plan_memory
from .memory.probe import probe_device
from .model_runner import ModelRunner
from .models.config import ModelConfig
from .profiles import DeviceProfile

log = logging.getLogger(__name__)


def measure_activation_and_overhead(runner: ModelRunner, config: EngineConfig, max_model_len: int, weights_bytes: int) -> tuple[int, int]:
    """Run the profile step and read what it took, with what the runtime itself holds.

    CUDA: the allocator's peak over the run plus what the decode graphs will keep (a trial
    capture), and the driver's used memory that the allocator
    does not account for (context, cuBLAS workspaces). CPU: the resident set's peak over the
    run above where it started, and the resident set beyond the weights before it.
    """
    args = (config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
    if config.device.type == "cuda":
        dev = config.device
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        runner.profile_run(*args)
        torch.cuda.synchronize(dev)
        activation = torch.cuda.max_memory_allocated(dev) - before
        torch.cuda.empty_cache()
        # Decode graphs keep their own memory pool beside the eager activations.
        activation += runner.measure_graph_bytes()
        free, total = torch.cuda.mem_get_info(dev)
        overhead = max(total - free - torch.cuda.memory_reserved(dev), 0)
        return activation, overhead
    rss = psutil.Process().memory_info().rss
    with _PeakRss() as peak:
        runner.profile_run(*args)
    return max(peak.bytes - rss, 0), max(rss - weights_bytes, 0)


class _PeakRss:
    """Samples the resident set while a block runs: the CPU allocator keeps no peak statistic,
    and the process's lifetime high-water mark may predate the block."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.bytes = max(self.bytes, proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, psutil.Process().memory_info().rss)


def plan_for(
    runner: ModelRunner,
    config: EngineConfig,
    model_config: ModelConfig,
    profile: DeviceProfile,
    *,
    weights_bytes: int,
    max_model_len: int,
    cap_blocks: int | None,
) -> MemoryPlan:
    """The memory plan for a loaded model: measure (or read what an earlier start measured),
    probe the device, then size the pool. The plan is logged at INFO, the memory table of
    `edgepaged serve`'s start-up report."""
    cache = PlanCache()
    key = PlanKey.of(config, model_config, profile, weights_bytes=weights_bytes, max_model_len=max_model_len)
    parts = cache.get(key)
    origin = f"measured at an earlier start ({cache.path(key)})"
    if parts is None:
        parts = MeasuredParts(*measure_activation_and_overhead(runner, config, max_model_len, weights_bytes))
        cache.put(key, parts)
        origin = "measured now by a profile run"
    model_dtype = str(config.dtype).removeprefix("torch.")
    plan = plan_memory(
        profile,
        probe_device(profile, config.device),
        weights_bytes=weights_bytes,
        activation_bytes=parts.activation_bytes,
        overhead_bytes=parts.overhead_bytes,
        kv_bytes_per_token=kv_token_bytes(model_config, config.kv_cache_dtype, model_dtype),
        max_kv_blocks=cap_blocks,
        max_model_len=max_model_len,
        kv_bytes_per_token_16bit=kv_token_bytes(model_config, "float16", model_dtype),
    )
    log.info(
        "memory plan: %s %s, %s backend on %s; activations and overhead %s\n%s",
        model_config.architecture, str(config.dtype).removeprefix("torch."), config.backend,
        config.device, origin, plan.format_table(),
    )
    return plan

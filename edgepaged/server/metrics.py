"""Prometheus metrics: the engine's state at scrape time plus per-request latency histograms.

Engine state (blocks, queues, token totals) is read from the engine loop's latest `EngineStats`
snapshot when Prometheus scrapes, so nothing is double-counted and the HTTP side never touches
the engine. Latencies are observed where the client sees them, in the HTTP handlers, since
time-to-first-token includes queueing, which the engine alone cannot see. Each app gets its own
registry so several servers can live in one process (tests, benchmarks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgepaged.outputs import EngineStats, RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges span a desktop GPU (milliseconds) to a loaded Orin Nano (tens of seconds).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


@dataclass(slots=True)
class QueueState:
    """The server's own admission queue, beside the engine's: what 429 decisions are made on."""

    waiting_requests: int
    waiting_tokens: int
    healthy: bool


class _EngineCollector(Collector):
    """Turns the latest stats snapshot into metric families at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], queue: Callable[[], QueueState]):
        self._stats = stats
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        q = self._queue()
        gauges = (
            ("edgepaged_kv_blocks_total", "KV-cache blocks in the pool.", s.num_blocks),
            ("edgepaged_kv_blocks_used", "KV-cache blocks held by live sequences.", s.blocks_used),
            ("edgepaged_kv_blocks_free", "KV-cache blocks free and holding nothing reusable.", s.blocks_free),
            ("edgepaged_kv_blocks_cached", "Free KV-cache blocks still holding a reusable prefix.", s.blocks_cached),
            (
                "edgepaged_prefix_cache_hit_ratio",
                "Prompt tokens served from the prefix cache / tokens looked up.",
                s.prefix_hit_rate,
            ),
            ("edgepaged_requests_running", "Requests the scheduler is running.", s.num_running),
            ("edgepaged_requests_waiting", "Requests waiting in the engine's scheduler.", s.num_waiting),
            (
                "edgepaged_server_queue_requests",
                "Admitted requests that have not produced a token yet.",
                q.waiting_requests,
            ),
            ("edgepaged_server_queue_prompt_tokens", "Prompt tokens of those requests.", q.waiting_tokens),
            ("edgepaged_engine_healthy", "1 while the engine loop runs and keeps up, else 0.", int(q.healthy)),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("edgepaged_preemptions", "Sequences preempted for lack of KV blocks.", s.num_preemptions),
            ("edgepaged_prompt_tokens", "Prompt tokens admitted to the engine.", s.prompt_tokens_total),
            ("edgepaged_generation_tokens", "Tokens generated.", s.generation_tokens_total),
            (
                "edgepaged_prefix_cache_query_tokens",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_query_tokens,
            ),
            ("edgepaged_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens),
            ("edgepaged_spec_draft_tokens", "Speculative draft tokens verified.", s.draft_tokens),
            ("edgepaged_spec_accepted_tokens", "Speculative draft tokens the model kept.", s.accepted_draft_tokens),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """Every metric the server exports, in one registry per app."""

    def __init__(self, stats: Callable[[], EngineStats], queue: Callable[[], QueueState]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats, queue))
        self.ttft = Histogram(
            "edgepaged_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "edgepaged_inter_token_latency_seconds",
            "Between consecutive generated tokens of one sequence, as delivered.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "edgepaged_e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "edgepaged_requests",
            "Requests answered, by outcome: a finish reason, 'rejected' (429) or 'error'.",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_request(self) -> RequestTimer:
        return RequestTimer(self, time.perf_counter())


@dataclass(slots=True)
class RequestTimer:
    """Follows one request's delta outputs and observes its latencies.

    Outputs may arrive coalesced (several tokens at once when the client or loop lagged); the
    gap is then spread evenly over the new tokens, so the histogram still counts one sample
    per token and its mean stays the true mean.
    """

    metrics: ServerMetrics
    arrival: float
    last_token_time: float | None = None
    outcome: str = field(default="abort")

    def observe(self, output: RequestOutput) -> None:
        """One delta output (OutputKind.DELTA): its new tokens, as many for each choice."""
        now = time.perf_counter()
        new = max((len(c.token_ids) for c in output.outputs), default=0)
        if output.finished:
            self.outcome = output.outputs[0].finish_reason or "stop"
        if new <= 0:
            return
        if self.last_token_time is None:
            self.metrics.ttft.observe(now - self.arrival)
            new -= 1
            self.last_token_time = now
        for _ in range(new):
            self.metrics.itl.observe((now - self.last_token_time) / new)
        self.last_token_time = now

    def finish(self) -> None:
        """Record the outcome; a request that never finished was aborted (client gone, drain)."""
        if self.outcome != "abort":
            self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.requests.labels(self.outcome).inc()

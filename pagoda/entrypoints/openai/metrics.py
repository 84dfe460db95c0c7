"""Entrypoints layer: the server's Prometheus metrics, named like vLLM's under a `pagoda:` prefix.

`ServerMetrics` is a stat logger registered with `AsyncLLM`: after every
engine step it gets the step's `IterationStats` (time to first token,
inter-token latencies, token counts, finished requests) and the scheduler's
latest `SchedulerStatsMessage` (running/waiting requests, KV-cache usage,
prefix-cache and preemption counts); `/metrics` also asks the engine for
its current gauges at each scrape. The scheduler's counters are cumulative, so
each Prometheus counter advances by how far the engine's count has moved.
The KV store's per-tier counters (also cumulative) and the image caches'
counters and levels are exported as they are, labelled by tier or cache, by a
collector reading the latest snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagoda.engine.iteration_stats import IterationStats
from pagoda.engine.messages import SchedulerStatsMessage

_PREFIX = "pagoda:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0)
# The image caches' numbers that are levels, not totals: how full a cache is now.
_MM_GAUGES = frozenset({"entries", "referenced", "free_rows", "cached_items"})
_CUMULATIVE_STATS = {
    "prefix_cache_queries": "Prefix-cache lookups, in tokens.",
    "prefix_cache_hits": "Prefix-cache hits, in tokens.",
    "num_preemptions": "Requests preempted to free KV blocks.",
}


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._model_name = model_name
        # Every series carries the model name, as vLLM's do; the children are made now so they show from 0.

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(_PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry)
            return metric.labels(model_name=model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(_PREFIX + name, doc, ["model_name"], registry=self.registry).labels(model_name=model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(_PREFIX + name, doc, ["model_name"], registry=self.registry).labels(model_name=model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between successive generated tokens.", _LATENCY_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time a finished request waited in the scheduler's queue before it "
            "first ran.", _E2E_BUCKETS)
        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        # Labelled by finish reason too, so this one keeps its parent.
        self.request_success = Counter(_PREFIX + "request_success", "Requests finished, by finish reason.",
                                       ["model_name", "finish_reason"], registry=self.registry)
        self._cumulative = {name: counter(name, doc) for name, doc in _CUMULATIVE_STATS.items()}
        self._last_cumulative = dict.fromkeys(_CUMULATIVE_STATS, 0)
        self.kv_store = GroupedMetrics(model_name, "kv_store", "KV store", "tier")
        self.registry.register(self.kv_store)
        self.multimodal = GroupedMetrics(model_name, "mm", "Image caches", "cache", gauges=_MM_GAUGES)
        self.registry.register(self.multimodal)

    def __call__(self, iteration_stats: IterationStats, scheduler_stats: SchedulerStatsMessage | None) -> None:
        self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for seconds in iteration_stats.time_to_first_tokens:
            self.time_to_first_token.observe(seconds)
        for seconds in iteration_stats.inter_token_latencies:
            self.inter_token_latency.observe(seconds)
        for finished in iteration_stats.finished_requests:
            self.e2e_request_latency.observe(finished.e2e_latency)
            if finished.queue_time is not None:
                self.request_queue_time.observe(finished.queue_time)
            self.request_success.labels(model_name=self._model_name,
                                       finish_reason=finished.finish_reason or "none").inc()
        if scheduler_stats is not None:
            self.record_scheduler_stats(scheduler_stats)

    def record_scheduler_stats(self, stats: SchedulerStatsMessage) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.kv_store is not None:
            self.kv_store.snapshot = stats.kv_store
        if stats.multimodal is not None:
            self.multimodal.snapshot = stats.multimodal
        for name, metric in self._cumulative.items():
            value = getattr(stats, name)
            if value > self._last_cumulative[name]:
                metric.inc(value - self._last_cumulative[name])
                self._last_cumulative[name] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GroupedMetrics(Collector):
    """`pagoda:<prefix>_<counter>_total{<label>=...}` and, for the names in `gauges`,
    `pagoda:<prefix>_<gauge>{<label>=...}`, from the engine's latest snapshot by group
    (the KV store's by tier, the image caches' by cache)."""

    def __init__(self, model_name: str, prefix: str, what: str, label: str,
                 gauges: frozenset[str] = frozenset()) -> None:
        self.model_name = model_name
        self.prefix, self.what, self.label = prefix, what, label
        self.gauges = gauges
        self.snapshot: dict[str, dict[str, float]] = {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for tier, counters in sorted(self.snapshot.items()):
            for name, value in sorted(counters.items()):
                family = families.get(name)
                if family is None:
                    kind = GaugeMetricFamily if name in self.gauges else CounterMetricFamily
                    family = families[name] = kind(
                        f"{_PREFIX}{self.prefix}_{name}", f"{self.what}: {name.replace('_', ' ')}, per {self.label}.",
                        labels=["model_name", self.label])
                family.add_metric([self.model_name, tier], value)
        yield from families.values()

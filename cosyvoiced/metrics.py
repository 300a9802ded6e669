"""Prometheus metrics over HTTP (`metrics.listen`; off by default, loopback unless allowed).

The supervisor updates them from its tick and at each job's end; prometheus_client's own
thread serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cosyvoiced.job import JobResult
from cosyvoiced.memory import Memory

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RTF = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_CACHE_COUNTERS = {"hits": "Jobs served from the result cache",
                   "misses": "Cacheable jobs not in the result cache (synthesized)",
                   "evictions": "Result cache entries removed to stay under cache.max_bytes",
                   "corrupt": "Result cache entries found damaged, deleted and made again"}
_CACHE_GAUGES = {"bytes": "Size of the result cache's entries",
                 "entries": "Entries in the result cache"}


class _CacheCollector(Collector):
    """Reads the cache's own counters at each scrape, so they are never out of step."""

    def __init__(self, figures: Callable[[], Mapping[str, Any]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self._figures()
        for name, text in _CACHE_COUNTERS.items():
            yield CounterMetricFamily(f"cosyvoiced_cache_{name}", text,
                                      value=figures.get(name, 0))
        for name, text in _CACHE_GAUGES.items():
            yield GaugeMetricFamily(f"cosyvoiced_cache_{name}", text,
                                    value=figures.get(name, 0))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("cosyvoiced_jobs", "Jobs ended, by intake and outcome",
                            ["source", "outcome"], registry=r)
        self.queue_depth = Gauge("cosyvoiced_queue_depth", "Jobs waiting to start",
                                 registry=r)
        self.synthesis_seconds = Histogram("cosyvoiced_synthesis_seconds",
                                           "Time the worker spent on a job", buckets=_SECONDS,
                                           registry=r)
        self.real_time_factor = Histogram("cosyvoiced_real_time_factor",
                                          "Synthesis seconds per second of audio",
                                          buckets=_RTF, registry=r)
        self.first_chunk_seconds = Histogram("cosyvoiced_first_chunk_seconds",
                                             "Synthesis start to the first audio chunk",
                                             buckets=_SECONDS, registry=r)
        self.recycles = Counter("cosyvoiced_worker_recycles", "Worker recycles by reason",
                                ["reason"], registry=r)
        self.worker_losses = Counter("cosyvoiced_worker_losses",
                                     "Workers that died or were killed, by reason", ["reason"],
                                     registry=r)
        self.worker_rss = Gauge("cosyvoiced_worker_rss_bytes", "Worker resident memory",
                                ["slot", "device"], registry=r)
        self.worker_gpu = Gauge("cosyvoiced_worker_gpu_bytes",
                                "Worker GPU memory (NVML or torch reserved; 0 without GPU)",
                                ["slot", "device"], registry=r)
        self.worker_busy = Gauge("cosyvoiced_worker_busy", "1 while the worker has a segment "
                                 "in hand", ["slot", "device"], registry=r)
        self.worker_generation = Gauge("cosyvoiced_worker_generation",
                                       "Workers started since the daemon started", registry=r)
        self.workers = Gauge("cosyvoiced_workers", "Worker slots (worker.devices x "
                             "worker.per_device)", registry=r)
        self.recycle_thrash = Gauge("cosyvoiced_recycle_thrash",
                                    "1 while workers are recycled for memory after at most "
                                    "one job each", registry=r)
        self.jobs_in_progress = Gauge("cosyvoiced_jobs_in_progress",
                                      "Jobs started and not yet ended", registry=r)
        self.watchdog_pings = Counter("cosyvoiced_watchdog_pings", "WATCHDOG=1 sent to systemd",
                                      registry=r)
        self.ready = Gauge("cosyvoiced_ready", "1 once the engine is loaded", registry=r)
        self.cluster_connected = Gauge("cosyvoiced_cluster_connected",
                                       "1 while the cluster's Redis answers (cluster.redis)",
                                       registry=r)
        self.jobs_taken_over = Counter("cosyvoiced_jobs_taken_over",
                                       "Shared jobs taken from a host that stopped answering",
                                       registry=r)

    def watch_cache(self, figures: Callable[[], Mapping[str, Any]]) -> None:
        """Export the result cache's counters (`ResultCache.figures`)."""
        self.registry.register(_CacheCollector(figures))

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)

    def job_ended(self, source: str, outcome: str, result: JobResult | None = None) -> None:
        self.jobs.labels(source, outcome).inc()
        if result is not None and not result.cached:  # a cache hit synthesized nothing
            self.synthesis_seconds.observe(result.synth_s)
            self.first_chunk_seconds.observe(result.first_chunk_s)
            if result.audio_s > 0:
                self.real_time_factor.observe(result.synth_s / result.audio_s)

    def worker(self, slot: int, device: str, memory: Memory, busy: bool) -> None:
        labels = (str(slot), device)
        self.worker_rss.labels(*labels).set(memory.rss_bytes)
        self.worker_gpu.labels(*labels).set(memory.gpu_peak_bytes or 0)
        self.worker_busy.labels(*labels).set(int(busy))

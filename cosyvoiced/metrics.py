"""Prometheus metrics over HTTP (`metrics.listen`; off by default, loopback unless allowed).

The supervisor updates them from its tick and at each job's end. A small aiohttp app on a
loop thread of its own serves them at `/metrics` only, with the HTTP intake's connection
limits (header and idle timeouts, a cap on connections): prometheus_client's own server
starts a thread per connection, holds idle ones for ever and answers on every path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cosyvoiced.config import MetricsConfig
from cosyvoiced.intake.limits import ConnectionLimits, listen
from cosyvoiced.intake.reply import START_TIMEOUT_S, LoopThread
from cosyvoiced.job import JobResult
from cosyvoiced.memory import Memory
from cosyvoiced.stages import SegmentStages

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Stages (stages.py): a GPU's decoding step or vocoder call takes milliseconds.
_STAGE_SECONDS = (0.001, 0.0025, 0.005, *_SECONDS)
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


class _StageMetrics:
    """Each segment's stage timings (stages.py), from engines that have stages."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.prefill = Histogram("cosyvoiced_llm_prefill_seconds", "LLM call to its first "
                                 "token, per segment", buckets=_STAGE_SECONDS, registry=r)
        self.token = Histogram("cosyvoiced_llm_token_seconds", "Mean time of one LLM "
                               "decoding step, per segment", buckets=_STAGE_SECONDS, registry=r)
        self.tokens = Counter("cosyvoiced_llm_tokens", "Speech tokens the LLM drew",
                              registry=r)
        self.flow = Histogram("cosyvoiced_flow_chunk_seconds", "Flow model (tokens to mel), "
                              "per chunk", buckets=_STAGE_SECONDS, registry=r)
        self.hift = Histogram("cosyvoiced_hift_chunk_seconds", "HiFT vocoder (mel to "
                              "samples), per chunk", buckets=_STAGE_SECONDS, registry=r)
        self.first_chunk = Histogram("cosyvoiced_segment_first_chunk_seconds", "Segment "
                                     "start to its first audio chunk",
                                     buckets=_STAGE_SECONDS, registry=r)

    def observe(self, stages: tuple[SegmentStages, ...]) -> None:
        for segment in stages:
            self.prefill.observe(segment.prefill_ms / 1000)
            if segment.tokens > 1:
                self.token.observe(segment.ms_per_token / 1000)
            self.tokens.inc(segment.tokens)
            for flow_ms in segment.flow_ms:
                self.flow.observe(flow_ms / 1000)
            for hift_ms in segment.hift_ms:
                self.hift.observe(hift_ms / 1000)
            self.first_chunk.observe(segment.first_chunk_ms / 1000)


@dataclass
class WorkerFigures:
    """One (slot, device)'s processes together: its worker, and one leaving or loading to
    take over (worker.spare), hold memory at once."""

    rss_bytes: int = 0
    gpu_bytes: int = 0
    streams: int = 0  # segments in hand
    max_streams: int = 0

    def add(self, memory: Memory, streams: int, max_streams: int) -> None:
        self.rss_bytes += memory.rss_bytes
        self.gpu_bytes += memory.gpu_peak_bytes or 0
        self.streams += streams
        self.max_streams = max(self.max_streams, max_streams)


class Metrics:
    def __init__(self) -> None:
        self._loop_thread: LoopThread | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("cosyvoiced_jobs", "Jobs ended, by intake and outcome",
                            ["source", "outcome"], registry=r)
        self.queue_depth = Gauge("cosyvoiced_queue_depth", "Jobs waiting to start",
                                 registry=r)
        self.tick_seconds = Histogram("cosyvoiced_tick_seconds", "How long one supervisor "
                                      "tick took (tickclock.py)", buckets=_STAGE_SECONDS,
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
        self._stages = _StageMetrics(r)
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
        self.worker_streams = Gauge("cosyvoiced_worker_streams", "Segments the worker has "
                                    "in hand (a batched worker makes several at once)",
                                    ["slot", "device"], registry=r)
        self.worker_max_streams = Gauge("cosyvoiced_worker_max_streams", "Segments the "
                                        "worker makes at once at most", ["slot", "device"],
                                        registry=r)
        self._worker_labels: set[tuple[str, str]] = set()  # (slot, device) published
        self.worker_generation = Gauge("cosyvoiced_worker_generation",
                                       "Workers started since the daemon started", registry=r)
        self.workers = Gauge("cosyvoiced_workers", "Worker slots (worker.devices x "
                             "worker.per_device)", registry=r)
        self.recycle_thrash = Gauge("cosyvoiced_recycle_thrash",
                                    "1 while workers are recycled for memory after at most "
                                    "one job each", registry=r)
        self.jobs_in_progress = Gauge("cosyvoiced_jobs_in_progress",
                                      "Jobs started and not yet ended", registry=r)
        self.reply_audio = Gauge("cosyvoiced_reply_audio_bytes", "The audio so far of the whole "
                                 "replies in progress: in the supervisor's memory, or on the "
                                 "spool's disk (unnamed files: df counts them, du does not)",
                                 ["where"], registry=r)
        self.watchdog_pings = Counter("cosyvoiced_watchdog_pings", "WATCHDOG=1 sent to systemd",
                                      registry=r)
        self.ready = Gauge("cosyvoiced_ready", "1 once the engine is loaded", registry=r)
        # Usage per client: an API key's name (key:NAME), a CURVE key, the drop folder, or
        # "anonymous" for every client that did not say who it is (bounded labels).
        self.client_chars = Counter("cosyvoiced_client_characters", "Characters of text "
                                    "served, by client", ["client"], registry=r)
        self.client_audio = Counter("cosyvoiced_client_audio_seconds", "Seconds of audio "
                                    "served, by client", ["client"], registry=r)
        self.cluster_connected = Gauge("cosyvoiced_cluster_connected",
                                       "1 while the cluster's Redis answers (cluster.redis)",
                                       registry=r)
        self.replies_undelivered = Counter(
            "cosyvoiced_replies_undelivered", "Jobs done whose client did not get the whole "
            "reply (it left or stopped reading, or the rest could not be encoded), by intake",
            ["source"], registry=r)
        self.jobs_taken_over = Counter("cosyvoiced_jobs_taken_over",
                                       "Shared jobs taken from a host that stopped answering",
                                       registry=r)

    def watch_cache(self, figures: Callable[[], Mapping[str, Any]]) -> None:
        """Export the result cache's counters (`ResultCache.figures`)."""
        self.registry.register(_CacheCollector(figures))

    def serve(self, settings: MetricsConfig) -> None:
        """Serve /metrics on metrics.listen; an OSError (address taken, ...) is raised."""
        host, _, port = settings.listen.rpartition(":")
        # No send timeout of its own: a scraper that takes none of a page is idle.
        limits = ConnectionLimits(settings.header_timeout_s, settings.idle_timeout_s,
                                  settings.max_connections, settings.idle_timeout_s)
        loop_thread = LoopThread("metrics-loop")
        loop_thread.start()
        try:
            loop_thread.call(self._serve(host.strip("[]"), int(port), limits), START_TIMEOUT_S)
        except BaseException:
            loop_thread.stop()
            raise
        # Never stopped: a daemon thread, it ends with the process, as the scrapes may
        # go on while the daemon drains.
        self._loop_thread = loop_thread

    async def _serve(self, host: str, port: int, limits: ConnectionLimits) -> None:
        app = web.Application()
        app.add_routes([web.get("/metrics", self._scrape)])
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await listen(runner, host, port, limits, "metrics")
        except BaseException:
            await runner.cleanup()
            raise

    async def _scrape(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def job_ended(self, source: str, outcome: str, result: JobResult | None = None,
                  client: str = "", chars: int = 0) -> None:
        self.jobs.labels(source, outcome).inc()
        if result is not None:
            label = client or "unknown"
            self.client_chars.labels(label).inc(chars)
            self.client_audio.labels(label).inc(result.audio_s)
        if result is not None and not result.cached:  # a cache hit synthesized nothing
            self.synthesis_seconds.observe(result.synth_s)
            self.first_chunk_seconds.observe(result.first_chunk_s)
            if result.audio_s > 0:
                self.real_time_factor.observe(result.synth_s / result.audio_s)
            self._stages.observe(result.stages)

    def workers_now(self, figures: dict[tuple[str, str], WorkerFigures]) -> None:
        """Each (slot, device)'s figures as of this tick; the series of one no longer there
        (a reload to fewer slots, a device changed) go, or sum() over them counted workers
        long gone."""
        for labels, now in figures.items():
            self.worker_rss.labels(*labels).set(now.rss_bytes)
            self.worker_gpu.labels(*labels).set(now.gpu_bytes)
            self.worker_busy.labels(*labels).set(int(now.streams > 0))
            self.worker_streams.labels(*labels).set(now.streams)
            self.worker_max_streams.labels(*labels).set(now.max_streams)
        for labels in self._worker_labels - figures.keys():
            for gauge in (self.worker_rss, self.worker_gpu, self.worker_busy,
                          self.worker_streams, self.worker_max_streams):
                gauge.remove(*labels)
        self._worker_labels = set(figures)

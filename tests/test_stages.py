"""Stage timings (stages.py): the job's totals, the per-segment log figures, the
histograms, and an engine without stages (Piper) that reports none. The CosyVoice engine's
own measurements are checked end to end in tests/cosyvoice/test_stage_timings.py."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cosyvoiced.job import JobResult
from cosyvoiced.metrics import Metrics
from cosyvoiced.stages import SegmentStages, job_timings
from tests.conftest import DaemonFactory
from tests.daemon import free_port, wait_until

FIRST = SegmentStages(prefill_ms=120.0, tokens=51, decode_ms=1000.0, flow_ms=(300.0, 500.0),
                      hift_ms=(40.0, 60.0), first_chunk_ms=900.0)
SECOND = SegmentStages(prefill_ms=80.0, tokens=11, decode_ms=200.0, flow_ms=(100.0,),
                       hift_ms=(20.0,), first_chunk_ms=400.0)
STAGE_KEYS = set(job_timings([FIRST]))


def test_a_segments_ms_per_token_leaves_out_the_prefills_token() -> None:
    assert FIRST.ms_per_token == pytest.approx(20.0)  # 1000 ms over 50 steps
    assert SegmentStages(10.0, 1, 0.0).ms_per_token == 0.0


def test_a_jobs_timings_add_its_segments_up() -> None:
    timings = job_timings([FIRST, SECOND])
    assert timings == {
        "llm_prefill_ms": 200.0, "llm_tokens": 62.0, "llm_decode_ms": 1200.0,
        "llm_ms_per_token": 20.0,  # 1200 ms over 50 + 10 steps
        "chunks": 3.0, "flow_ms": 900.0, "flow_ms_per_chunk": 300.0,
        "hift_ms": 120.0, "hift_ms_per_chunk": 40.0}


def test_a_job_without_stages_has_no_stage_timings() -> None:
    assert job_timings([]) == {}


def test_a_segments_summary_rounds_to_the_microsecond() -> None:
    segment = SegmentStages(1.23456789, 3, 2.0, (0.0004,), (7.0,), 5.5)
    assert segment.summary() == {"prefill_ms": 1.235, "tokens": 3, "ms_per_token": 1.0,
                                 "flow_ms": [0.0], "hift_ms": [7.0], "first_chunk_ms": 5.5}


def _samples(text: str) -> dict[str, float]:
    return {sample.name + "".join(f"{{{key}={value}}}"
                                  for key, value in sorted(sample.labels.items())):
            sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_histograms_take_every_segment_and_every_chunk() -> None:
    metrics = Metrics()
    metrics.job_ended("zmq", "done", JobResult("j", "v", 24000, 48000, 3.0, 0.9,
                                               stages=(FIRST, SECOND)))
    samples = _samples(generate_latest(metrics.registry).decode())
    assert samples["cosyvoiced_llm_prefill_seconds_count"] == 2
    assert samples["cosyvoiced_llm_prefill_seconds_sum"] == pytest.approx(0.2)
    assert samples["cosyvoiced_llm_token_seconds_count"] == 2
    assert samples["cosyvoiced_llm_token_seconds_sum"] == pytest.approx(0.04)
    assert samples["cosyvoiced_llm_tokens_total"] == 62
    assert samples["cosyvoiced_flow_chunk_seconds_count"] == 3
    assert samples["cosyvoiced_flow_chunk_seconds_sum"] == pytest.approx(0.9)
    assert samples["cosyvoiced_hift_chunk_seconds_count"] == 3
    assert samples["cosyvoiced_segment_first_chunk_seconds_count"] == 2
    # A decoding step of 20 ms lands in its own bucket, not in the first one.
    assert samples["cosyvoiced_llm_token_seconds_bucket{le=0.01}"] == 0
    assert samples["cosyvoiced_llm_token_seconds_bucket{le=0.025}"] == 2


def test_an_engine_without_stages_reports_none(make_daemon: DaemonFactory) -> None:
    """Piper has no stages: no stage keys in the record or the log line, and the stage
    histograms stay empty."""
    port = free_port()
    daemon = make_daemon(metrics={"listen": f"127.0.0.1:{port}"})
    daemon.start()
    daemon.drop("plain.txt", "Piper has no language model stage.")
    record = daemon.wait_done("plain.txt")
    assert not STAGE_KEYS & set(record["timings"])
    line = wait_until(lambda: daemon.log_events("job"), 10, "the job's log line")[0]
    assert "stages" not in line
    assert not STAGE_KEYS & set(line)

    def scraped() -> dict[str, float] | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            found = _samples(reply.read().decode())
        return found if found.get("cosyvoiced_jobs_total{outcome=done}{source=inbox}") else None

    samples = wait_until(scraped, 10, "the job in the metrics")
    assert samples["cosyvoiced_llm_prefill_seconds_count"] == 0
    assert samples["cosyvoiced_flow_chunk_seconds_count"] == 0

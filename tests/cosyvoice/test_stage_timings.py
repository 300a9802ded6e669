"""Stage timings of the cosyvoice engine, end to end: the real daemon and upstream code on
the tiny model, each segment's LLM prefill, tokens, decoding, flow and HiFT chunks in the
`job` log line, the job's totals in its record, and every one in /metrics."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cosyvoiced.client import Client
from tests.cosyvoice.conftest import cosyvoice_daemon
from tests.cosyvoice.test_cosyvoice import LONG, SHORT, TIMEOUT_S
from tests.daemon import Daemon, free_port, wait_until

# Speech tokens per second of audio: CosyVoice-300M's tokenizer runs at 50 Hz, CosyVoice2
# and 3's at 25 Hz.
TOKEN_RATE = {1: 50, 2: 25, 3: 25}
TWO_SEGMENTS = f"{LONG} {LONG}"  # past upstream's 60-80 tokens: the daemon splits it
# No clause mark: a streamed job's first segment is then the whole first sentence, and
# this text two segments of the same length.
SENTENCE = ("Each chunk leaves the worker as soon as upstream yields it and the client hears "
            "it in order.")


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory,
            model_dir: Any) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    running = cosyvoice_daemon(tmp_path_factory.mktemp("stages"), model_dir, log_level="info",
                               sections={"metrics": {"listen": f"127.0.0.1:{port}"}})
    running.start()
    yield running, port
    running.stop()
    shutil.rmtree(running.root / "state", ignore_errors=True)


def _job_line(daemon: Daemon, job: str) -> dict[str, Any]:
    lines = wait_until(lambda: [event for event in daemon.log_events("job")
                                if event["job"] == job], 10, "the job's log line")
    line: dict[str, Any] = lines[0]
    return line


def _stream(client: Client, text: str) -> tuple[str, int, float]:
    """The job id, the chunks heard and the seconds of audio of one streamed job."""
    chunks, samples = 0, 0
    with client.stream(text) as stream:
        for pcm in stream:
            chunks += 1
            samples += len(pcm) // 2
        return str(stream.start["job"]), chunks, samples / int(stream.start["sample_rate"])


def test_each_segment_reports_its_stages_in_the_job_line(metered: tuple[Daemon, int],
                                                         model_version: int) -> None:
    daemon, _ = metered
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as client:
        job, chunks, audio_s = _stream(client, TWO_SEGMENTS)
    line = _job_line(daemon, job)
    segments = line["stages"]
    assert len(segments) == line["segments"] >= 2
    for segment in segments:
        assert segment["prefill_ms"] > 0
        assert segment["tokens"] > 1
        assert segment["ms_per_token"] > 0
        assert len(segment["flow_ms"]) == len(segment["hift_ms"]) >= 1
        assert min(segment["flow_ms"] + segment["hift_ms"]) > 0
        assert segment["first_chunk_ms"] > 0
    # Every chunk the client heard was one flow call and one HiFT call.
    assert sum(len(segment["flow_ms"]) for segment in segments) == line["chunks"] == chunks
    assert segments[0]["first_chunk_ms"] == pytest.approx(line["first_chunk_s"] * 1000, abs=1)
    tokens = sum(segment["tokens"] for segment in segments)
    assert line["llm_tokens"] == tokens
    assert tokens / audio_s == pytest.approx(TOKEN_RATE[model_version], rel=0.15)


def test_the_job_record_holds_the_jobs_stage_totals(metered: tuple[Daemon, int]) -> None:
    daemon, _ = metered
    daemon.drop_job("totals", text=SHORT)
    record = daemon.wait_done("totals.json", TIMEOUT_S)
    timings = record["timings"]
    line = _job_line(daemon, record["job"])
    for key in ("llm_prefill_ms", "llm_tokens", "llm_decode_ms", "llm_ms_per_token", "chunks",
                "flow_ms", "flow_ms_per_chunk", "hift_ms", "hift_ms_per_chunk"):
        assert timings[key] == line[key] > 0, key
    assert timings["llm_tokens"] == sum(segment["tokens"] for segment in line["stages"])
    assert timings["flow_ms"] == pytest.approx(sum(sum(segment["flow_ms"])
                                                   for segment in line["stages"]), abs=0.01)


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def test_the_metrics_count_every_segment_chunk_and_token(metered: tuple[Daemon, int]) -> None:
    daemon, port = metered
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as client:
        _job_line(daemon, client.synthesize(SHORT).job)
    # Every job of this daemon so far (the module's other tests' too; not the warm-up).
    segments = [segment for line in daemon.log_events("job") for segment in line["stages"]]
    flow = [ms for segment in segments for ms in segment["flow_ms"]]

    def scraped() -> dict[str, float] | None:
        found = _metrics(port)
        return found if found["cosyvoiced_llm_prefill_seconds_count"] == len(segments) else None

    samples = wait_until(scraped, 10, "the metrics of every job so far")
    assert samples["cosyvoiced_llm_token_seconds_count"] == len(segments)
    assert samples["cosyvoiced_llm_tokens_total"] == sum(s["tokens"] for s in segments)
    assert samples["cosyvoiced_flow_chunk_seconds_count"] == len(flow)
    assert samples["cosyvoiced_flow_chunk_seconds_sum"] == pytest.approx(sum(flow) / 1000,
                                                                         rel=1e-3)
    assert samples["cosyvoiced_hift_chunk_seconds_count"] == len(flow)
    assert samples["cosyvoiced_segment_first_chunk_seconds_count"] == len(segments)


def test_a_jobs_later_segments_carry_on_with_the_hop_it_reached(
        metered: tuple[Daemon, int], model_version: int) -> None:
    """CosyVoice2 and 3 stream with a hop that grows during a call. A job's first segment
    starts small, for an early first chunk; its later ones, heard after that audio, carry
    on with the bigger hop, as upstream's own call over several text segments does, and so
    make fewer chunks (each recomputes the flow over the segment's tokens so far)."""
    if model_version == 1:
        pytest.skip("CosyVoice-300M's hop is fixed per call")
    daemon, _ = metered
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as client:
        job, _, _ = _stream(client, f"{SENTENCE} {SENTENCE}")
    first, second = _job_line(daemon, job)["stages"]
    assert first["tokens"] == second["tokens"], "the same text: the same length"
    assert len(second["flow_ms"]) < len(first["flow_ms"]), (first, second)

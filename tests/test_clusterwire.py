"""What goes through Redis between daemons: jobs and events survive the trip exactly, and a
Redis URL is logged without its password."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from cosyvoiced import audio
from cosyvoiced import clusterwire as wire
from cosyvoiced.cluster import safe_url
from cosyvoiced.job import SINK_REPLY, Job, ResultAudio
from cosyvoiced.scheduler import Priority

JOB_ID = "1a0000000000000b2"


def _as_read(fields: dict[str, bytes | memoryview] | dict[str, bytes]) -> wire.Fields:
    # As redis-py returns them: bytes, whatever went in.
    return {key.encode(): bytes(value) for key, value in fields.items()}


def test_a_job_and_its_prompt_make_the_trip_unchanged() -> None:
    job = Job("1a0000000000000a1", "zmq", "r1", "Hello there.", voice="v", format="ogg",
              sample_rate=16000, speed=1.25, sink=SINK_REPLY, stream=True,
              prompt_audio="/spool/prompts/p", prompt_text="Prompt.", instruct="Calmly.",
              language="en", cache=False)
    shared = wire.read_job("k:jobs:interactive", "1-0",
                           _as_read(wire.job_fields(job, "host-a", b"RIFF...")), 2)
    assert shared.job == Job(**{**job.__dict__, "prompt_audio": None})  # never a path
    assert (shared.host, shared.prompt, shared.deliveries) == ("host-a", b"RIFF...", 2)
    served = wire.served_job(shared, "host-a-1a0000000000000a1", "/here/prompts/x")
    assert (served.id, served.prompt_audio, served.text) == ("host-a-1a0000000000000a1",
                                                              "/here/prompts/x",
                                                              job.text)


def test_an_entry_that_is_not_a_job_is_refused_with_the_reason() -> None:
    with pytest.raises(wire.WireError, match="unknown job fields"):
        wire.read_job("s", "1-0", {b"job": b'{"id": "x", "from_the_future": 1}', b"host": b"h"})
    with pytest.raises(wire.WireError, match="not a job entry"):
        wire.read_job("s", "1-0", {b"something": b"else"})
    deep = b"[" * 100_000 + b"]" * 100_000  # nested too deep for json: still a WireError
    with pytest.raises(wire.WireError, match="not a job entry: nested too deep"):
        wire.read_job("s", "1-0", {b"job": deep, b"host": b"h"})
    shallower = b"[" * 30_000 + b"]" * 30_000  # within MAX_DETAIL_BYTES, still too deep
    with pytest.raises(wire.WireError, match="not an event entry: nested too deep"):
        wire.read_event("1-0", {b"kind": b"chunk", b"job": b"j", b"from": b"h",
                                b"detail": shallower})


def test_an_event_field_over_its_bound_is_refused_before_it_is_decoded() -> None:
    event = {b"kind": b"part", b"job": b"1a0000000000000e1", b"from": b"b",
             b"detail": b'{"seq": 0}'}
    assert wire.read_event("1-0", event | {b"audio": bytes(wire.PART_BYTES)}).kind == "part"
    with pytest.raises(wire.WireError, match=f"audio: {wire.PART_BYTES + 4} bytes is over"):
        wire.read_event("1-0", event | {b"audio": bytes(wire.PART_BYTES + 4)})
    with pytest.raises(wire.WireError, match="is over 0 for a b'done' event"):
        wire.read_event("1-0", event | {b"kind": b"done", b"audio": bytes(4)})
    with pytest.raises(wire.WireError, match="detail: 65537 bytes is over 65536"):
        wire.read_event("1-0", event | {b"detail": b" " * 65_537})


def test_a_reader_takes_one_entry_at_a_time_at_first_and_after_a_big_one() -> None:
    count = wire.ReadCount(16, 100)
    assert count.count == 1
    for expected in (2, 4, 8, 16, 16):
        count.after([{b"a": b"small"}])
        assert count.count == expected
    count.after([])  # a read that found nothing: no change
    assert count.count == 16
    count.after([{b"a": b"small"}, {b"a": bytes(100)}])
    assert count.count == 1


@pytest.mark.parametrize(("made_rate", "rate", "sizes"), [
    (22050, 22050, (5, 22050, 1, 7)), (22050, 48000, (5, 22050, 1, 7)),
    # Where the exact count ends in half a frame soxr rounds either way: 367.5 -> 367 and
    # 514.5 -> 515 (`frames` said 368 and 514; the buffer was sized to it and overflowed).
    (24000, 22050, (100, 300)), (24000, 22050, (60, 500))])
def test_a_whole_reply_is_made_into_parts_a_chunk_at_a_time(
        made_rate: int, rate: int, sizes: tuple[int, ...]) -> None:
    """A whole reply's audio, made into `part` events on the link's writer thread from the
    workers' chunks (resampled when the reply asks another rate): the same samples as
    joining them whole, in parts of the size asked but the last."""
    rng = np.random.default_rng(7)
    chunks = tuple(rng.uniform(-0.5, 0.5, size).astype(np.float32) for size in sizes)
    made = ResultAudio(chunks, made_rate, rate)
    part_bytes = 4 * 1000
    read = [wire.read_event(f"1-{seq}", _as_read(wire.event_fields(
        wire.Event(wire.PART, JOB_ID, "host-b", {"seq": seq}, data))))
        for seq, data in enumerate(audio.float32_parts(made, part_bytes))]
    assert {len(event.audio) for event in read[:-1]} <= {part_bytes}
    assert 0 < len(read[-1].audio) <= part_bytes
    joined = np.concatenate([event.samples for event in read])
    whole = audio.whole(made)
    assert len(joined) == len(whole)
    assert abs(made.frames - len(whole)) <= 1
    assert np.abs(joined - whole).max() < 1e-3  # streamed vs at once


def test_an_event_carries_float32_audio_exactly() -> None:
    samples = np.linspace(-1, 1, 1001, dtype=np.float32)
    event = wire.Event(wire.CHUNK, JOB_ID, "host-b", {"seq": 3}, wire.audio_bytes(samples))
    read = wire.read_event("5-1", _as_read(wire.event_fields(event)))
    assert (read.kind, read.job_id, read.sender, read.detail, read.entry) == (
        wire.CHUNK, JOB_ID, "host-b", {"seq": 3}, "5-1")
    assert np.array_equal(read.samples, samples)


def _job_entry(host: str = "host-a", prompt: bytes | None = None, **change: Any) -> wire.Fields:
    job = Job(JOB_ID, "zmq", "r1", "Hello there.", voice="v", sample_rate=16000)
    fields = wire.job_fields(job, host, prompt)
    fields["job"] = json.dumps(asdict(job) | change).encode()
    return _as_read(fields)


# An entry is as untrusted as a LAN request: each of these reached the tick, which died
# (exit 5, on every host in turn as they took the entry over), or wrote outside the spool.
@pytest.mark.parametrize(("entry", "reason"), [
    (_job_entry(text=1), "job.text: expected"),
    (_job_entry(voice=["v"]), "job.voice: expected"),
    (_job_entry(sample_rate=True), "job.sample_rate: expected"),
    (_job_entry(speed="fast"), "job.speed: expected"),
    (_job_entry(speed=10**400), "job.speed: expected"),  # OverflowError, not a WireError
    (_job_entry(id="../../../etc/x"), "job.id: expected a job id"),
    (_job_entry(text="x" * (wire.MAX_TEXT_CHARS + 1)), "job.text: 1000001 characters"),
    (_job_entry(output="o" * 5000), "job.output: 5000 characters"),
    (_job_entry(host="/../../../tmp/"), "host: expected a host name"),
    (_job_entry(prompt=b"\0" * (wire.MAX_PROMPT_BYTES + 1)), "prompt: 67108865 bytes"),
    ({b"job": b"[1, 2]", b"host": b"h"}, "job: expected a JSON object"),
])
def test_a_job_entry_of_the_wrong_types_or_names_is_refused(entry: wire.Fields,
                                                            reason: str) -> None:
    with pytest.raises(wire.WireError, match=re.escape(reason)):
        wire.read_job("s", "1-0", entry)


def _event(kind: str, detail: Any, audio: bytes = b"", job: str = JOB_ID,
           sender: str = "host-b") -> wire.Fields:
    return {b"kind": kind.encode(), b"job": job.encode(), b"from": sender.encode(),
            b"detail": json.dumps(detail).encode(), b"audio": audio}


DONE = {"voice": "v", "sample_rate": 16000, "samples": 1, "synth_s": 0.1,
        "first_chunk_s": 0.1, "timings": {}}


@pytest.mark.parametrize(("entry", "reason"), [
    (_event(wire.STARTED, {}), "sample_rate: expected a whole number"),
    (_event(wire.STARTED, {"sample_rate": 0}), "sample_rate: expected a whole number"),
    (_event(wire.CHUNK, [], b"\0" * 4), "detail: expected a JSON object"),
    (_event(wire.CHUNK, {"seq": 0}, b"\0" * 3), "whole float32 samples"),
    (_event(wire.CHUNK, {"seq": "0"}), "seq: expected a whole number"),
    (_event(wire.DONE, DONE | {"sample_rate": 0}), "sample_rate: expected"),
    (_event(wire.DONE, DONE | {"timings": None}), "timings: an object"),
    (_event(wire.DONE, DONE | {"synth_s": -1}), "synth_s, first_chunk_s"),
    # A `started_at` of another type killed the tick on every restart (exit 5): the event
    # stayed in Redis. A whole number of 400 digits killed the event reader's every try
    # (OverflowError, not a WireError), which read it again from the first.
    (_event(wire.DONE, DONE | {"timings": {"started_at": "x"}}), "timings: an object of"),
    (_event(wire.DONE, DONE | {"timings": {"started_at": 10**400}}), "timings: an object"),
    (_event(wire.DONE, DONE | {"timings": {"started_at": -1.0}}), "timings: an object"),
    (_event(wire.DONE, DONE | {"synth_s": 10**400}), "synth_s, first_chunk_s"),
    (_event(wire.FAILED, {"error": {"code": "no_such_code", "message": "m"}}),
     "is not an error code"),
    (_event(wire.FAILED, {"error": "bad"}), "error: expected {code, message}"),
    (_event("explode", {}), "is not an event's"),
    (_event(wire.CANCEL, {}, job="../x"), "job: expected a job id"),
    (_event(wire.CANCEL, {}, sender="a/../b"), "from: expected a host name"),
])
def test_an_event_of_the_wrong_shape_is_refused(entry: wire.Fields, reason: str) -> None:
    with pytest.raises(wire.WireError, match=re.escape(reason)):
        wire.read_event("1-0", entry)


def test_well_formed_events_of_every_kind_are_read() -> None:
    error = {"code": "worker_crashed", "message": "m", "field": None}
    for kind, detail in ((wire.STARTED, {"sample_rate": 16000}), (wire.DONE, DONE),
                         (wire.FAILED, {"error": error}), (wire.CANCELLED, {}),
                         (wire.CANCEL, {})):
        assert wire.read_event("1-0", _event(kind, detail)).detail == detail


def test_keys_share_one_prefix_for_an_acl_and_interactive_comes_first() -> None:
    keys = wire.Keys("tts")
    assert keys.job_streams() == ["tts:jobs:interactive", "tts:jobs:bulk"]
    assert keys.jobs(Priority.BULK) == "tts:jobs:bulk"
    assert keys.events("a") == "tts:events:a"
    assert keys.marker("a", "j") == "tts:job:a:j"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://user:pw@host:6380/1", "rediss://user:***@host:6380/1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    # redis-py takes it as a query parameter too: shown as it was in stats and logs
    ("redis://host:6379/0?password=pw&db=2", "redis://host:6379/0?password=***&db=2"),
    ("unix:///run/redis.sock?pass%77ord=pw", "unix:///run/redis.sock?password=***"),
    ("rediss://u:pw@h/0?password=pw2", "rediss://u:***@h/0?password=***"),
])
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_a_job_that_no_host_could_read_is_named_unshareable() -> None:
    job = Job(id="ab12", source="zmq", origin="o", text="x")
    assert wire.unshareable(job, wire.MAX_PROMPT_BYTES) is None
    assert "prompt" in str(wire.unshareable(job, wire.MAX_PROMPT_BYTES + 1))
    long_text = Job(id="ab12", source="zmq", origin="o", text="x" * (wire.MAX_TEXT_CHARS + 1))
    assert "job.text" in str(wire.unshareable(long_text, 0))
    assert wire.unshareable(Job(id="ab12", source="zmq", origin="o",
                                text="x" * wire.MAX_FIELD_CHARS * 2), 0) is None
    long_voice = Job(id="ab12", source="zmq", origin="o", text="x", voice="v" * 5000)
    assert "job.voice" in str(wire.unshareable(long_voice, 0))

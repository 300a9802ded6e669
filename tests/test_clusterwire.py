"""What goes through Redis between daemons: jobs and events survive the trip exactly, and a
Redis URL is logged without its password."""

from __future__ import annotations

import numpy as np
import pytest

from cosyvoiced import clusterwire as wire
from cosyvoiced.cluster import safe_url
from cosyvoiced.job import SINK_REPLY, Job
from cosyvoiced.scheduler import Priority


def _as_read(fields: dict[str, bytes]) -> wire.Fields:
    return {key.encode(): value for key, value in fields.items()}  # as redis-py returns them


def test_a_job_and_its_prompt_make_the_trip_unchanged() -> None:
    job = Job("id1", "zmq", "r1", "Hello there.", voice="v", format="ogg", sample_rate=16000,
              speed=1.25, sink=SINK_REPLY, stream=True, prompt_audio="/spool/prompts/p",
              prompt_text="Prompt.", instruct="Calmly.", language="en", cache=False)
    shared = wire.read_job("k:jobs:interactive", "1-0",
                           _as_read(wire.job_fields(job, "host-a", b"RIFF...")), 2)
    assert shared.job == Job(**{**job.__dict__, "prompt_audio": None})  # never a path
    assert (shared.host, shared.prompt, shared.deliveries) == ("host-a", b"RIFF...", 2)
    served = wire.served_job(shared, "host-a-id1", "/here/prompts/x")
    assert (served.id, served.prompt_audio, served.text) == ("host-a-id1", "/here/prompts/x",
                                                              job.text)


def test_an_entry_that_is_not_a_job_is_refused_with_the_reason() -> None:
    with pytest.raises(wire.WireError, match="unknown job fields"):
        wire.read_job("s", "1-0", {b"job": b'{"id": "x", "from_the_future": 1}', b"host": b"h"})
    with pytest.raises(wire.WireError, match="not a job entry"):
        wire.read_job("s", "1-0", {b"something": b"else"})
    deep = b"[" * 100_000 + b"]" * 100_000  # nested too deep for json: still a WireError
    with pytest.raises(wire.WireError, match="not a job entry: nested too deep"):
        wire.read_job("s", "1-0", {b"job": deep, b"host": b"h"})
    with pytest.raises(wire.WireError, match="not an event entry: nested too deep"):
        wire.read_event("1-0", {b"kind": b"chunk", b"job": b"j", b"from": b"h",
                                b"detail": deep})


def test_an_event_carries_float32_audio_exactly() -> None:
    samples = np.linspace(-1, 1, 1001, dtype=np.float32)
    event = wire.Event(wire.CHUNK, "job", "host-b", {"seq": 3}, wire.audio_bytes(samples))
    read = wire.read_event("5-1", _as_read(wire.event_fields(event)))
    assert (read.kind, read.job_id, read.sender, read.detail, read.entry) == (
        wire.CHUNK, "job", "host-b", {"seq": 3}, "5-1")
    assert np.array_equal(read.samples, samples)


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
])
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown

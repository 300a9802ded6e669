"""Characters no engine can take (NUL and other control characters, lone surrogates) are
refused with `invalid_field` naming where they are, instead of failing in the engine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cosyvoiced import config
from cosyvoiced.job import ErrorCode, JobFailure
from cosyvoiced.jobspec import Limits, build_job, check_text
from tests.daemon import Daemon, free_port

LIMITS = Limits(max_text_chars=1000, default_format="wav")


def _build(**fields: Any) -> None:
    build_job(fields, job_id="j", source="test", origin="j", default_output="out",
              limits=LIMITS)


@pytest.mark.parametrize(("text", "position", "shown"), [
    ("Hello\0world", 5, "U+0000"),
    ("\x07bell", 0, "U+0007"),
    ("form\x0cfeed", 4, "U+000C"),
    ("delete\x7f", 6, "U+007F"),
    ("c1 \x85control", 3, "U+0085"),
    ("lone \ud800 high", 5, "U+D800"),
    ("lone low \udfff", 9, "U+DFFF"),
])
def test_text_with_a_control_character_or_a_lone_surrogate_is_refused(
        text: str, position: int, shown: str) -> None:
    with pytest.raises(JobFailure) as refused:
        check_text(text, LIMITS)
    error = refused.value.error
    assert (error.code, error.field) == (ErrorCode.INVALID_FIELD, "text")
    assert error.message.startswith("text: ")
    assert f"character {position}" in error.message
    assert shown in error.message


def test_tabs_line_breaks_and_ordinary_unicode_pass() -> None:
    text = "Tab\there,\r\nline\nbreaks, caf\u00e9, \u4f60\u597d, \U0001f600 and \u00a0nbsp."
    # As written: the clean-up (on by default) would drop the emoji (test_text_cleanup).
    assert check_text(text, LIMITS, normalize=False) == text


@pytest.mark.parametrize("name", ["voice", "instruct", "prompt_text", "output"])
def test_a_lone_surrogate_in_any_string_field_is_refused(name: str) -> None:
    with pytest.raises(JobFailure) as refused:
        _build(text="Hello.", **{name: "bad\udc80name"})
    error = refused.value.error
    assert (error.code, error.field) == (ErrorCode.INVALID_FIELD, name)
    assert "U+DC80" in error.message
    assert "character 3" in error.message


@pytest.mark.parametrize("name", ["instruct", "prompt_text"])
def test_a_control_character_in_text_for_the_engine_is_refused(name: str) -> None:
    with pytest.raises(JobFailure) as refused:
        _build(text="Hello.", **{name: "Speak\0softly."})
    error = refused.value.error
    assert (error.code, error.field) == (ErrorCode.INVALID_FIELD, name)


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("text-checks"),
                     http={"listen": f"127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def _post_speech(daemon: Daemon, body: bytes) -> tuple[int, dict[str, Any]]:
    listen = config.load(daemon.config_path).http.listen
    request = urllib.request.Request(f"http://{listen}/v1/audio/speech", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, {"audio_bytes": len(reply.read())}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("text", ["Hello\u0000world.", "Hello \ud800 world."])
def test_http_refuses_them_with_400_invalid_field(http_daemon: Daemon, text: str) -> None:
    # json.dumps writes both as \u escapes, as any client's JSON encoder would.
    body = json.dumps({"model": "tts-1", "voice": "en_US-joe-medium", "input": text}).encode()
    status, reply = _post_speech(http_daemon, body)
    assert status == 400, reply
    assert (reply["error"]["code"], reply["error"]["param"]) == ("invalid_field", "input")
    assert "character" in reply["error"]["message"]
    # The daemon still serves: the refusal cost nothing.
    fine = json.dumps({"model": "tts-1", "voice": "en_US-joe-medium", "input": "Fine."})
    assert _post_speech(http_daemon, fine.encode())[0] == 200

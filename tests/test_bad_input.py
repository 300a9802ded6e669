"""Every class of bad input ends in failed/ with its own error code; the daemon keeps going."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable

import numpy as np
import pytest
import soundfile

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

Drop = Callable[[Daemon, str], str]  # drops a bad job named after the test; returns the input


def _json(fields: object) -> Drop:
    def drop(daemon: Daemon, name: str) -> str:
        daemon.drop(f"{name}.json", json.dumps(fields))
        return f"{name}.json"

    return drop


def _raw(suffix: str, data: bytes) -> Drop:
    def drop(daemon: Daemon, name: str) -> str:
        daemon.drop(f"{name}{suffix}", data)
        return f"{name}{suffix}"

    return drop


def _symlink(daemon: Daemon, name: str) -> str:
    target = daemon.root / "secret.txt"
    target.write_text("This file is outside the spool and must never be read.")
    os.symlink(target, daemon.inbox / f"{name}.txt")
    return f"{name}.txt"


def _hard_link(daemon: Daemon, name: str) -> str:
    """A file linked into the inbox: it may be one the submitter cannot read itself."""
    target = daemon.root / "linked-secret.txt"
    target.write_text("This file is outside the spool and must never be read.")
    os.link(target, daemon.inbox / f".{name}")  # renamed in, to be taken at once
    os.rename(daemon.inbox / f".{name}", daemon.inbox / f"{name}.txt")
    return f"{name}.txt"


def _directory(daemon: Daemon, name: str) -> str:
    staging = daemon.inbox / f".{name}"
    staging.mkdir()
    os.rename(staging, daemon.inbox / f"{name}.txt")
    return f"{name}.txt"


CASES: dict[str, tuple[Drop, str, str | None]] = {
    # case: (how to drop it, expected code, expected field)
    "invalid_utf8": (_raw(".txt", b"caf\xe9 au lait"), "invalid_utf8", None),
    "empty_text": (_raw(".txt", b"  \n\t "), "empty_text", "text"),
    "empty_json_text": (_json({"text": ""}), "empty_text", "text"),
    "text_too_long": (_raw(".txt", b"word " * 100), "text_too_long", "text"),
    "bad_json": (_raw(".json", b'{"text": "unterminated'), "bad_json", None),
    # It raised RecursionError out of the parser: the supervisor's tick died on it.
    "deep_json": (_raw(".json", b"[" * 4000 + b"]" * 4000), "bad_json", None),
    "json_not_object": (_json(["text"]), "bad_json", None),
    "missing_text": (_json({"voice": "en_US-joe-medium"}), "missing_field", "text"),
    "unknown_field": (_json({"text": "Hi.", "colour": "blue"}), "unknown_field", "colour"),
    "wrong_type": (_json({"text": "Hi.", "speed": "fast"}), "invalid_field", "speed"),
    "speed_out_of_range": (_json({"text": "Hi.", "speed": 50}), "invalid_field", "speed"),
    "bad_sample_rate": (_json({"text": "Hi.", "sample_rate": 1234}), "invalid_field",
                        "sample_rate"),
    "unknown_voice": (_json({"text": "Hi.", "voice": "nobody"}), "unknown_voice", "voice"),
    "unknown_format": (_json({"text": "Hi.", "format": "mp3"}), "unsupported_format",
                       "format"),
    "output_escapes": (_json({"text": "Hi.", "output": "../../escaped"}),
                       "invalid_output_name", "output"),
    "output_dotfile": (_json({"text": "Hi.", "output": ".hidden"}), "invalid_output_name",
                       "output"),
    "symlink": (_symlink, "symlink", None),
    "hard_link": (_hard_link, "hard_link", None),
    "directory": (_directory, "not_regular_file", None),
    "file_too_large": (_raw(".txt", b"a" * 9000), "file_too_large", None),
    "unsupported_file_type": (_raw(".pdf", b"%PDF-1.4"), "unsupported_file_type", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_failed_with_specific_code(shared_daemon: Daemon, case: str) -> None:
    drop, code, field = CASES[case]
    name = drop(shared_daemon, f"bad-{case}")
    record = shared_daemon.wait_failed(name)
    assert record["code"] == code, record
    assert record.get("field") == field, record
    assert record["message"]
    if field is not None:
        assert record["message"].startswith(f"{field}:"), record["message"]
    # The input is kept beside its error record (moved just after the record, which is
    # the commit point), and nothing reached the outbox.
    wait_until(lambda: os.path.lexists(shared_daemon.failed / name), 10, "the input moved")
    assert not list(shared_daemon.outbox.glob(f"bad-{case}*"))
    assert not list(shared_daemon.work.iterdir())
    # The daemon keeps serving.
    shared_daemon.drop(f"after-{case}.txt", "Still here.")
    shared_daemon.wait_done(f"after-{case}.txt")


def test_nothing_escapes_the_spool(shared_daemon: Daemon) -> None:
    shared_daemon.drop_job("escape-check", text="Hi.", output="../../escaped")
    shared_daemon.wait_failed("escape-check.json")
    assert not (shared_daemon.spool.parent / "escaped.wav").exists()
    assert not (shared_daemon.root / "escaped.wav").exists()


def test_piper_refuses_voice_cloning_and_returns_the_prompt(shared_daemon: Daemon) -> None:
    """Audio in the inbox waits for the job that names it; Piper cannot clone, so the job
    fails with `not_supported`, and its prompt goes to failed/ with it."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    shared_daemon.drop("clone-me.wav", buffer.getvalue())
    shared_daemon.drop_job("clone", text="Hi.", prompt_audio="clone-me.wav",
                           prompt_text="Hello.")
    record = shared_daemon.wait_failed("clone.json")
    assert (record["code"], record["field"]) == ("not_supported", "prompt_audio"), record
    wait_until((shared_daemon.failed / "clone-me.wav").exists, 10,
               "the prompt beside its job")
    assert not (shared_daemon.inbox / "clone-me.wav").exists()
    assert not list((shared_daemon.spool / "prompts").iterdir())


def test_prompt_audio_with_another_name_is_refused(shared_daemon: Daemon) -> None:
    """A hard link to audio the daemon can read and the submitter may not: never cloned."""
    target = shared_daemon.root / "someone-else.wav"
    soundfile.write(target, np.zeros(16000, dtype=np.float32), 16000)
    os.link(target, shared_daemon.inbox / "linked.wav")
    shared_daemon.drop_job("linked-clone", text="Hi.", prompt_audio="linked.wav",
                           prompt_text="Hello.")
    record = shared_daemon.wait_failed("linked-clone.json")
    assert (record["code"], record["field"]) == ("hard_link", "prompt_audio"), record


def _drop_as(daemon: Daemon, name: str, data: bytes, uid: int) -> None:
    temp = daemon.root / f".{name}.tmp"
    temp.write_bytes(data)
    os.chown(temp, uid, uid)
    os.rename(temp, daemon.inbox / name)


def _alice_names_bobs_audio(daemon: Daemon) -> str:
    """Bob (uid 61002) drops bobs.wav, then Alice (61001) a job that names it: the job."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    _drop_as(daemon, "bobs.wav", buffer.getvalue(), 61002)
    job = json.dumps({"text": "Hi.", "prompt_audio": "bobs.wav", "prompt_text": "Hello."})
    _drop_as(daemon, "alices.json", job.encode(), 61001)
    return job


@pytest.mark.skipif(os.geteuid() != 0, reason="files of two other users: needs root")
def test_a_job_may_not_take_another_users_prompt_audio(shared_daemon: Daemon) -> None:
    """The sticky inbox keeps one submitter from renaming or deleting another's drop, but a
    job of one user's that named another's audio took it: cloned it, then deleted it (and
    its owner's own job failed, prompt_audio_not_found)."""
    job = _alice_names_bobs_audio(shared_daemon)
    record = shared_daemon.wait_failed("alices.json")
    assert (record["code"], record["field"]) == ("not_owner", "prompt_audio"), record
    assert (shared_daemon.inbox / "bobs.wav").exists()  # Bob's, where he left it
    # Bob's own job takes it (Piper cannot clone: not_supported, past the owner check).
    _drop_as(shared_daemon, "bobs.json", job.encode(), 61002)
    record = shared_daemon.wait_failed("bobs.json")
    assert record["code"] == "not_supported", record


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="files of two other users, a user namespace: needs root")
def test_in_a_user_namespace_another_users_prompt_audio_is_still_refused(
        make_daemon: DaemonFactory) -> None:
    """Under the unit's PrivateUsers=yes every submitter's file showed as nobody's, so the
    owner check passed for any two: Alice's job cloned Bob's voice. Owners it cannot tell
    apart are refused, with the reason."""
    daemon = make_daemon("namespaced")
    daemon.start(wrapper=("unshare", "--user", "--map-root-user"))
    _alice_names_bobs_audio(daemon)
    record = daemon.wait_failed("alices.json")
    assert (record["code"], record["field"]) == ("not_owner", "prompt_audio"), record
    assert "PrivateUsers=" in record["message"]
    assert (daemon.inbox / "bobs.wav").exists()


@pytest.mark.parametrize(("fields", "field"), [
    ({"text": "Hi.", "prompt_audio": "../escape.wav"}, "prompt_audio"),
    ({"text": "Hi.", "language": "klingon"}, "language"),
    ({"text": "Hi.", "instruct": ""}, "instruct"),
])
def test_cloning_fields_are_checked_on_arrival(shared_daemon: Daemon, fields: dict[str, str],
                                               field: str) -> None:
    shared_daemon.drop_job(f"field-{field}", **fields)
    record = shared_daemon.wait_failed(f"field-{field}.json")
    assert (record["code"], record["field"]) == ("invalid_field", field), record

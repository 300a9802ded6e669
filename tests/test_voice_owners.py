"""Registered voices belong to the client that registered them, and the store is bounded:
on the real daemon, with the official `openai` client over HTTP and our ZeroMQ client.

Every client may speak with every voice; only its owner or an admin may replace or remove
it, and each client registers at most engine.cosyvoice.max_voices_per_client of the
engine.cosyvoice.max_voices that every worker holds. The cloning engine
(tests/engines/faulty.py) speaks a voice's prompt audio as a tone of the same length, so a
test hears which recording a voice holds.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cosyvoiced import clients, config, speakers
from cosyvoiced.client import Client, DaemonError
from cosyvoiced.job import ErrorCode
from cosyvoiced.voicerules import registration_refusal, removal_refusal
from tests.daemon import Daemon, free_port, wait_until
from tests.test_http_voices import (
    TEXT,
    assert_spoken,
    recording,
    refusal,
    register,
    speak,
    stalled_upload,
)
from tests.test_speakers_store import noise_recording

ALICE, BOB, ROOT = "sk-alice-0123456789", "sk-bob-0123456789", "sk-root-0123456789"
MAX_VOICES, PER_CLIENT = 4, 2
TIMEOUT_S = 60.0
LONG_VOICES = 32  # engine.cosyvoice.max_voices' default


KEYED = clients.keyed("key", "alice")
OTHER = clients.keyed("key", "bob")
ADMIN = clients.keyed("key", "root", admin=True)
ANONYMOUS = clients.anonymous("zmq:01"), clients.anonymous("zmq:02")


def _codes(refusals: list[object]) -> list[str | None]:
    return [getattr(refusal, "code", None) for refusal in refusals]


def test_owners_and_admins_manage_a_voice_and_no_one_else() -> None:
    owners = {"mine": KEYED.voice_owner, "anon": clients.ANONYMOUS, "old": ""}
    for name, allowed in (("mine", {KEYED, ADMIN}), ("anon", {*ANONYMOUS, ADMIN}),
                          ("old", {ADMIN})):
        for who in (KEYED, OTHER, ADMIN, *ANONYMOUS):
            expected = None if who in allowed else ErrorCode.NOT_OWNER
            assert _codes([registration_refusal(who, name, owners, 99, 99),
                           removal_refusal(who, name, owners)]) == [expected] * 2, (name, who)
    assert _codes([removal_refusal(ADMIN, "nobody", owners),
                   removal_refusal(ADMIN, ["mine"], owners)]) == [ErrorCode.UNKNOWN_VOICE] * 2


def test_new_voices_fit_in_the_store_and_the_clients_share() -> None:
    owners = {"a1": KEYED.voice_owner, "a2": KEYED.voice_owner, "b1": OTHER.voice_owner}
    assert _codes([registration_refusal(KEYED, "a3", owners, 4, 2),
                   registration_refusal(KEYED, "a1", owners, 3, 2),  # a replacement
                   registration_refusal(OTHER, "b2", owners, 4, 2),
                   registration_refusal(OTHER, "b2", owners, 3, 2),
                   registration_refusal(ADMIN, "r1", owners, 4, 0),
                   registration_refusal(ADMIN, "r1", owners, 3, 99)]) == \
        [ErrorCode.TOO_MANY_VOICES, None, None, ErrorCode.TOO_MANY_VOICES, None,
         ErrorCode.TOO_MANY_VOICES]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "api_keys").write_text(f"alice {ALICE}\nbob {BOB}\nroot {ROOT}\n")
    state = tmp_path / "state"
    state.mkdir()
    # A voice stored before voices had owners: the operator's.
    entry = {"prompt_text": "Old words.", "registered_at": "2026-01-01T00:00:00Z",
             "audio_flac": base64.b64encode(speakers.prepare(recording(1.0))).decode()}
    (state / "speakers.json").write_text(json.dumps({"version": 1,
                                                     "speakers": {"old": entry}}))
    running = Daemon(tmp_path, engine={"name": "tests.engines.faulty:cloning"},
                     engine__cosyvoice={"speakers_file": str(state / "speakers.json"),
                                        "max_voices": MAX_VOICES,
                                        "max_voices_per_client": PER_CLIENT},
                     http={"listen": f"127.0.0.1:{free_port()}",
                           "api_keys_file": str(tmp_path / "api_keys")},
                     http__keys__root={"admin": True})
    running.start()
    yield running
    running.stop()


def _openai(daemon: Daemon, key: str) -> openai.OpenAI:
    listen = config.load(daemon.config_path).http.listen
    return openai.OpenAI(base_url=f"http://{listen}/v1", api_key=key, max_retries=0,
                         timeout=TIMEOUT_S)


def test_only_the_owner_or_an_admin_replaces_or_removes_a_voice(daemon: Daemon) -> None:
    alice, bob, root = (_openai(daemon, key) for key in (ALICE, BOB, ROOT))
    register(alice, "alice", recording(2.0), "I am Alice.")
    # Bob speaks with it, but cannot put his recording in its place, nor remove it.
    assert_spoken(speak(bob, "alice"), TEXT, 2.0)
    with pytest.raises(openai.PermissionDeniedError) as replaced:
        register(bob, "alice", recording(1.0), "I am Bob now.")
    assert refusal(replaced) == (403, "not_owner", "name")
    with pytest.raises(openai.PermissionDeniedError) as removed:
        bob.audio.voices.delete("alice")
    assert refusal(removed) == (403, "not_owner", "name")
    assert_spoken(speak(alice, "alice"), TEXT, 2.0)
    # Its owner replaces it; an admin replaces it too, and it stays Alice's.
    register(alice, "alice", recording(1.5), "Alice again.")
    register(root, "alice", recording(2.5), "Fixed by the operator.")
    assert_spoken(speak(bob, "alice"), TEXT, 2.5)
    register(alice, "alice", recording(1.5), "Mine still.")
    # A voice from before voices had owners is the operator's.
    with pytest.raises(openai.PermissionDeniedError):
        alice.audio.voices.delete("old")
    assert root.audio.voices.delete("old").deleted
    assert root.audio.voices.delete("alice").deleted
    with pytest.raises(openai.NotFoundError) as gone:
        alice.audio.voices.delete("alice")
    assert refusal(gone) == (404, "not_found", "name")


def test_anonymous_zeromq_clients_share_their_voices_and_not_a_keys(daemon: Daemon) -> None:
    alice = _openai(daemon, ALICE)
    register(alice, "alice", recording(2.0), "I am Alice.")
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as first, \
            Client(daemon.endpoint, timeout_s=TIMEOUT_S) as second:
        first.register_voice("anon", recording(1.0), "Anyone's.")
        for name in ("alice", "old"):
            with pytest.raises(DaemonError) as caught:
                second.remove_voice(name)
            assert (caught.value.code, caught.value.header.get("reason"),
                    caught.value.field) == ("forbidden", "not_owner", "name")
            with pytest.raises(DaemonError):
                second.register_voice(name, recording(1.0), "Taken over.")
        assert second.remove_voice("anon")["event"] == "voice_removed"
    # A local cosyvoicectl holds the admin token.
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S,
                admin_token=daemon.admin_token()) as operator:
        assert operator.remove_voice("alice")["event"] == "voice_removed"
    assert_spoken(speak(alice, "old"), TEXT, 1.0)


def test_each_client_and_the_store_hold_a_bounded_number_of_voices(daemon: Daemon) -> None:
    alice, bob, root = (_openai(daemon, key) for key in (ALICE, BOB, ROOT))
    for name in ("a1", "a2"):
        register(alice, name, recording(1.0))
    with pytest.raises(openai.PermissionDeniedError) as third:
        register(alice, "a3", recording(1.0))
    assert refusal(third) == (403, "too_many_voices", "name")
    assert "max_voices_per_client" in str(third.value.message)
    register(alice, "a1", recording(1.5))  # replacing one of its own takes no more room
    register(bob, "b1", recording(1.0))
    # "old", a1, a2, b1: the store is full, for Bob and for an admin alike.
    for client in (bob, root):
        with pytest.raises(openai.PermissionDeniedError) as full:
            register(client, "more", recording(1.0))
        assert refusal(full) == (403, "too_many_voices", "name")
        assert "engine.cosyvoice.max_voices" in str(full.value.message)
    alice.audio.voices.delete("a2")
    register(bob, "b2", recording(1.0))
    assert_spoken(speak(alice, "b2"), TEXT, 1.0)
    stored = json.loads((daemon.root / "state" / "speakers.json").read_text())["speakers"]
    assert {name: entry.get("owner", "") for name, entry in stored.items()} == \
        {"old": "", "a1": "key:alice", "b1": "key:bob", "b2": "key:bob"}


def test_a_prompt_text_longer_than_thirty_seconds_of_speech_is_refused(
        daemon: Daemon) -> None:
    alice = _openai(daemon, ALICE)
    with pytest.raises(openai.BadRequestError) as caught:
        register(alice, "chatty", recording(2.0), "Words. " * 200)
    assert refusal(caught) == (400, "invalid_field", "text")
    assert "chatty" not in json.loads((daemon.root / "state" / "speakers.json").read_text())[
        "speakers"]


def _refused_busy(client: openai.OpenAI) -> bool:
    """A cheap request that takes a slot first: 429 when none is free to it, else 415."""
    with pytest.raises(openai.APIStatusError) as caught:
        client.post("/audio/voices", body={}, cast_to=object)
    assert caught.value.status_code in (415, 429), caught.value
    return caught.value.status_code == 429


def test_one_client_stalling_uploads_leaves_slots_to_the_others(daemon: Daemon) -> None:
    """At most 4 uploads are read at once; one client stalling its own held all 4, and
    every other client's registration got 429. Now a client holds at most 2."""
    alice, bob, root = (_openai(daemon, key) for key in (ALICE, BOB, ROOT))
    stalled = [stalled_upload(daemon, ALICE) for _ in range(4)]
    try:
        wait_until(lambda: _refused_busy(alice), 10, "Alice's next upload refused")
        register(bob, "bob", recording(1.0), "Bob gets a slot.")
        stalled += [stalled_upload(daemon, BOB) for _ in range(2)]
        wait_until(lambda: _refused_busy(root), 10, "every slot held")
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: not _refused_busy(alice), 10, "the slots given back")



def test_the_owners_are_read_again_only_when_the_file_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registration and removal is checked against the owners; the file holds every
    voice's audio (tens of MB with 32), and was parsed again for each request of a flood."""
    store = speakers.SpeakerStore(tmp_path / "speakers.json")
    store.store("one", "The first.", speakers.prepare(recording(1.0)), owner="key:alice")
    parses: list[int] = []
    real_loads = json.loads

    def counted(text: str | bytes) -> object:
        parses.append(1)
        return real_loads(text)

    monkeypatch.setattr(json, "loads", counted)  # the module speakers.py reads it from
    for _ in range(100):
        assert store.owners() == {"one": "key:alice"}
    assert len(parses) == 1
    store.store("two", "The second.", speakers.prepare(recording(1.0)), owner="key:bob")
    assert store.owners() == {"one": "key:alice", "two": "key:bob"}
    store.remove("one")
    assert store.owners() == {"two": "key:bob"}


def test_registering_beside_many_long_voices_holds_no_tick(tmp_path: Path) -> None:
    """32 voices of 30 s of noise (FLAC that does not compress) made the speakers file 56 MB
    of base64, and each registration parsed, rewrote and fsynced all of it on the tick (1.2 s
    on a test VM), for every client. Such a file is upgraded at the start (each voice's audio
    a file of its own), and a registration writes its own audio and a small file."""
    state = tmp_path / "state"
    state.mkdir()
    entries = {f"v{n}": {"prompt_text": "Noise.", "registered_at": "2026-01-01T00:00:00Z",
                         "audio_flac": base64.b64encode(speakers.prepare(
                             noise_recording(30.0, n))).decode()}
               for n in range(LONG_VOICES - 1)}
    (state / "speakers.json").write_text(json.dumps({"version": 1, "speakers": entries}))
    daemon = Daemon(tmp_path, engine={"name": "tests.engines.faulty:cloning"},
                    engine__cosyvoice={"speakers_file": str(state / "speakers.json")},
                    http={"listen": f"127.0.0.1:{free_port()}"})
    daemon.start()
    try:
        [upgraded] = daemon.log_events("speakers_upgraded")
        assert upgraded["voices"] == LONG_VOICES - 1
        slow_before = len(daemon.log_events("tick_slow"))
        client = _openai(daemon, "none")
        for seed in range(3):  # registered, then replaced twice
            register(client, "mine", noise_recording(30.0, 100 + seed), "Mine.")
        slow = daemon.log_events("tick_slow")[slow_before:]
        assert not slow, slow
        assert (state / "speakers.json").stat().st_size < 20_000
        assert len(list((state / "speakers.audio").iterdir())) == LONG_VOICES
        assert_spoken(speak(client, "mine"), TEXT, 30.0)
        assert_spoken(speak(client, "v3"), TEXT, 30.0)
    finally:
        daemon.stop()

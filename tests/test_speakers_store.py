"""The registered voices' store: a small JSON file naming them, each voice's audio in a file
of its own (a registration once rewrote every voice's audio, base64 in the JSON file, on the
supervisor's tick). Pure file work, no daemon."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import structlog.testing

from cosyvoiced import speakers
from cosyvoiced.speakers import SpeakerStore


def noise_recording(seconds: float, seed: int) -> bytes:
    """A recording that does not compress: its stored FLAC is as big as a voice's gets."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    samples = (0.3 * rng.standard_normal(int(seconds * speakers.STORED_RATE))).astype("float32")
    soundfile.write(buffer, samples, speakers.STORED_RATE, format="WAV")
    return buffer.getvalue()


def _audio_files(store: SpeakerStore) -> list[str]:
    return sorted(path.name for path in store.audio_dir.iterdir())


def test_a_voice_audio_is_a_file_of_its_own_and_goes_with_the_voice(tmp_path: Path) -> None:
    store = SpeakerStore(tmp_path / "speakers.json")
    store.add("alice", "I am Alice.", noise_recording(2.0, 1))
    store.add("bob", "I am Bob.", noise_recording(3.0, 2))
    assert store.audio_dir == tmp_path / "speakers.audio"
    assert len(_audio_files(store)) == 2
    assert (tmp_path / "speakers.json").stat().st_size < 2000  # names, not audio
    assert {s.name: len(s.audio) for s in store.load()} == {
        "alice": 2 * speakers.STORED_RATE, "bob": 3 * speakers.STORED_RATE}
    first = _audio_files(store)
    store.add("alice", "Alice again.", noise_recording(1.0, 3))  # replaced: its old audio goes
    assert len(_audio_files(store)) == 2
    assert set(_audio_files(store)) != set(first)
    assert store.remove("bob")
    assert len(_audio_files(store)) == 1
    assert [(s.name, len(s.audio)) for s in store.load()] == [
        ("alice", speakers.STORED_RATE)]


def test_a_file_with_the_audio_inline_is_read_and_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "speakers.json"
    flac = speakers.prepare(noise_recording(2.0, 4))
    entry = {"prompt_text": "Old words.", "registered_at": "2026-01-01T00:00:00Z",
             "audio_flac": base64.b64encode(flac).decode()}
    path.write_text(json.dumps({"version": 1, "speakers": {"old": entry}}))
    store = SpeakerStore(path)
    before = store.load()
    assert store.upgrade() == 1
    assert store.upgrade() == 0
    written = json.loads(path.read_text())
    assert written["version"] == speakers.FORMAT_VERSION
    assert "audio_flac" not in written["speakers"]["old"]
    assert written["speakers"]["old"]["prompt_text"] == "Old words."
    [after] = store.load()
    assert np.array_equal(after.audio, before[0].audio)
    assert (store.audio_dir / written["speakers"]["old"]["audio"]).read_bytes() == flac


def test_an_audio_name_that_is_not_a_digest_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / "speakers.json"
    (tmp_path / "secret").write_text("not yours")
    entry = {"prompt_text": "Words.", "audio": "../secret"}
    path.write_text(json.dumps({"version": 2, "speakers": {"evil": entry}}))
    with pytest.raises(ValueError, match="not named by its digest"):
        SpeakerStore(path).load()


def test_a_voice_whose_audio_is_missing_is_left_out_and_the_others_load(
        tmp_path: Path) -> None:
    """A file restored without its audio directory, or an audio file deleted by hand: that
    voice is unknown (and logged), and every other voice still loads."""
    store = SpeakerStore(tmp_path / "speakers.json")
    store.add("kept", "Kept.", noise_recording(1.0, 5))
    store.add("lost", "Lost.", noise_recording(1.0, 6))
    lost = json.loads(store.path.read_text())["speakers"]["lost"]["audio"]
    (store.audio_dir / lost).unlink()
    with structlog.testing.capture_logs() as logged:
        assert [speaker.name for speaker in store.load()] == ["kept"]
    assert [(e["event"], e["voices"]) for e in logged] == [("voice_audio_missing", ["lost"])]


def test_a_new_voice_is_taken_up_without_decoding_the_others_again(tmp_path: Path) -> None:
    """Each registration made every worker decode every voice again (32 of 30 s: 0.3 s of its
    CPU, for any client's registration): unchanged voices keep the audio already decoded."""
    store = SpeakerStore(tmp_path / "speakers.json")
    store.add("alice", "I am Alice.", noise_recording(2.0, 8))
    store.add("bob", "I am Bob.", noise_recording(2.0, 9))
    before = {speaker.name: speaker.audio for speaker in store.load()}
    store.add("carol", "I am Carol.", noise_recording(1.0, 10))
    store.add("bob", "Bob again.", noise_recording(3.0, 11))
    after = {speaker.name: speaker.audio for speaker in store.load()}
    assert after["alice"] is before["alice"]
    assert after["bob"] is not before["bob"]
    assert len(after["bob"]) == 3 * speakers.STORED_RATE
    assert not after["alice"].flags.writeable  # shared: nobody may change it in place

"""The result cache with the cosyvoice engine: registered voices and prompt audio in the key.

The tiny model samples its speech tokens, so two syntheses of one text differ: a
byte-identical repeat can only have come from the cache.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cosyvoiced.client import Client
from tests.cosyvoice.conftest import cosyvoice_daemon
from tests.cosyvoice.test_cosyvoice import TIMEOUT_S, prompt_audio
from tests.daemon import Daemon, toml_value

TEXT = "Hello from a very small model."


def _with_cache(daemon: Daemon) -> None:
    """The lane's config, with the cache turned on."""
    table = tomllib.loads(daemon.config_path.read_text())
    table["cache"]["max_bytes"] = "64MiB"
    lines: list[str] = []

    def section(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items()
                     if not isinstance(value, dict))
        for key, value in values.items():
            if isinstance(value, dict):
                section(f"{name}.{key}", value)

    for name, values in table.items():
        section(name, values)
    daemon.config_path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Daemon]:
    running = cosyvoice_daemon(tmp_path_factory.mktemp("cosyvoice-cache"), model_dir)
    _with_cache(running)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as connected:
        yield connected


def test_a_prompt_is_part_of_the_key(client: Client) -> None:
    prompt = prompt_audio(16000, 2.0)
    first = client.synthesize(TEXT, prompt, prompt_text="A test prompt.", format="wav")
    second = client.synthesize(TEXT, prompt, prompt_text="A test prompt.", format="wav")
    assert (first.header["cached"], second.header["cached"]) == (False, True)
    assert second.audio == first.audio
    other = client.synthesize(TEXT, prompt_audio(16000, 2.5), prompt_text="A test prompt.")
    assert other.header["cached"] is False
    assert client.synthesize(TEXT, prompt, prompt_text="Another text.").header["cached"] is False


def test_a_registered_voice_is_cached_until_it_changes_or_goes(client: Client,
                                                               daemon: Daemon) -> None:
    client.register_voice("carol", prompt_audio(22050, 3.0), "My name is Carol.")
    first = client.synthesize(TEXT, voice="carol", format="wav")
    second = client.synthesize(TEXT, voice="carol", format="wav")
    assert (first.header["cached"], second.header["cached"]) == (False, True)
    assert second.audio == first.audio
    entries = len(list(daemon.cache_dir.glob("*.entry")))
    # Registered again with another recording: its old entry goes, the text is made again.
    client.register_voice("carol", prompt_audio(22050, 2.5), "My name is Carol.")
    assert len(list(daemon.cache_dir.glob("*.entry"))) == entries - 1
    again = client.synthesize(TEXT, voice="carol", format="wav")
    assert again.header["cached"] is False
    assert client.synthesize(TEXT, voice="carol").header["cached"] is True
    client.remove_voice("carol")
    assert len(list(daemon.cache_dir.glob("*.entry"))) == entries - 1
    assert daemon.log_events("cache_voice_entries_removed")

"""What the engine offers every intake (its voices, features and native rate, from the first
worker that loaded it), and the voices clients register and remove in it.

A registered voice is stored in the one speakers file, which every worker reads: it is
refused up front (voicerules.py: fields, owners, bounds) before its audio is decoded in the
encoder process, and checked again when it is stored. The service (service.py) holds one
catalog; the intakes register and remove voices through it (`service.catalog`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cosyvoiced import logs, voicerules
from cosyvoiced.clients import Identity
from cosyvoiced.config import CosyVoiceConfig
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import ErrorCode, JobError
from cosyvoiced.messages import EngineReady
from cosyvoiced.speakers import SpeakerStore

log = logs.get_logger("cosyvoiced.supervisor")


class Catalog:
    def __init__(self, engine_name: str, speakers: SpeakerStore,
                 bounds: Callable[[], CosyVoiceConfig],
                 voices_changed: Callable[[], None]) -> None:
        self.engine_name = engine_name  # the configured one until a worker loads it
        self.voices: list[VoiceInfo] = []
        self.features: frozenset[str] = frozenset()
        self.loaded = False  # a worker has loaded the engine: its features are known
        self.native_rate = 0
        self._speakers, self._bounds = speakers, bounds
        self._voices_changed = voices_changed  # the result cache's entries of a voice go

    def take(self, message: EngineReady) -> None:
        """A worker has loaded the engine: its catalog is ours."""
        self.voices, self.engine_name = message.voices, message.engine
        self.features, self.native_rate = message.features, message.native_rate
        self.loaded = True

    def registration_refusal(self, identity: Identity, name: Any, prompt_text: Any,
                             language: Any = "") -> JobError | None:
        """Why `identity` cannot register a voice so (None: it can), before its audio is
        decoded (in the encoder process: `Encoder.read_prompt`)."""
        refusal = voicerules.fields_refusal(name, prompt_text, language,
                                            engine_name=self.engine_name,
                                            engine_features=self.features if self.loaded
                                            else None, voices=self.voices)
        if refusal is not None:
            return refusal
        bounds = self._bounds()
        return voicerules.registration_refusal(identity, name, self._speakers.owners(),
                                               bounds.max_voices, bounds.max_voices_per_client)

    def store_voice(self, identity: Identity, name: Any, prompt_text: Any, audio_flac: bytes,
                    language: Any = "") -> VoiceInfo | JobError:
        """Register (or replace, keeping its owner) a voice whose audio was `prepare`d:
        every intake and every worker sees it from the one speakers file."""
        refusal = self.registration_refusal(identity, name, prompt_text, language)
        if refusal is not None:
            return refusal
        try:
            self._speakers.store(name, prompt_text, audio_flac, language, identity.voice_owner)
        except OSError as error:
            log.error("voice_store_failed", voice=name, error=str(error))
            return JobError(ErrorCode.INTERNAL, f"the voice could not be stored: {error}")
        self._voices_changed()  # a replaced voice's entries go
        voice = VoiceInfo(name, language, self.native_rate, self.engine_name, kind="registered")
        self.voices = [v for v in self.voices if v.name != name] + [voice]
        log.info("voice_registered", voice=name, client=identity.name)
        return voice

    def remove_voice(self, identity: Identity, name: Any) -> JobError | None:
        """Remove a registered voice `identity` may remove (`voicerules`)."""
        refusal = voicerules.removal_refusal(identity, name, self._speakers.owners())
        if refusal is not None:
            return refusal
        self._speakers.remove(name)
        self._voices_changed()  # its entries go
        self.voices = [v for v in self.voices if not (v.name == name and v.kind == "registered")]
        log.info("voice_removed", voice=name, client=identity.name)
        return None

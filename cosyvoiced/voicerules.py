"""Who may register, replace or remove which voice: pure decisions on the store's owners
(`SpeakerStore.owners`), tested without a daemon.

Every worker holds every registered voice's prompt features, so the store is bounded as a
whole (`max_voices`) and per client (`max_voices_per_client`; an admin's are not counted).
A voice belongs to `Identity.voice_owner` of whoever registered it; only that owner or an
admin may replace or remove it.
"""

from __future__ import annotations

from typing import Any

from cosyvoiced.clients import Identity
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import ErrorCode, JobError, JobFailure
from cosyvoiced.protocol import quoted
from cosyvoiced.speakers import check_language, check_name, check_prompt_text


def fields_refusal(name: Any, prompt_text: Any, language: Any, *, engine_name: str,
                   engine_features: frozenset[str] | None,
                   voices: list[VoiceInfo]) -> JobError | None:
    """What is wrong with a registration's fields, on this engine (None: nothing);
    `engine_features` None: no worker has loaded the engine yet."""
    try:
        if engine_features is None:
            # Whether it clones, and its built-in voices' names, are known once it is loaded
            # (minutes, for CosyVoice): `busy`, which a client retries, not `not_supported`,
            # which a script setting up its voices at boot took as final.
            raise JobFailure(ErrorCode.BUSY, f"the {engine_name} engine is still loading: a "
                             "voice can be registered once it is ready; retry in a few "
                             "seconds")
        if "prompt_audio" not in engine_features:
            raise JobFailure(ErrorCode.NOT_SUPPORTED, f"the {engine_name} engine cannot clone "
                             "voices; registering one needs engine.name = \"cosyvoice\"")
        check_name(name)
        check_prompt_text(prompt_text)
        check_language(language)
        if any(v.name == name and v.kind == "builtin" for v in voices):
            raise JobFailure(ErrorCode.INVALID_FIELD, f"name: {name!r} is a built-in voice "
                             "of the model; choose another name", "name")
    except JobFailure as failure:
        return failure.error
    return None


def registration_refusal(identity: Identity, name: str, owners: dict[str, str],
                         max_voices: int, max_per_client: int) -> JobError | None:
    """Why `identity` may not register `name` (a valid name) now; None: it may."""
    if name in owners:
        return _owner_refusal(identity, name, owners[name])
    if len(owners) >= max_voices:
        return JobError(ErrorCode.TOO_MANY_VOICES, f"name: {max_voices} voices are "
                        "registered, the most this daemon keeps (engine.cosyvoice.max_voices); "
                        "remove one first", "name")
    own = sum(owner == identity.voice_owner for owner in owners.values())
    if not identity.admin and own >= max_per_client:
        return JobError(ErrorCode.TOO_MANY_VOICES, f"name: this client has registered {own} "
                        "voices, the most one client may (engine.cosyvoice."
                        "max_voices_per_client); remove one first", "name")
    return None


def removal_refusal(identity: Identity, name: Any, owners: dict[str, str]) -> JobError | None:
    """Why `identity` may not remove `name`; `unknown_voice` when no voice is registered
    so; None: it may."""
    if not isinstance(name, str) or name not in owners:
        return JobError(ErrorCode.UNKNOWN_VOICE, f"name: no registered voice {quoted(name)} "
                        "(built-in voices cannot be removed)", "name")
    return _owner_refusal(identity, name, owners[name])


def _owner_refusal(identity: Identity, name: str, owner: str) -> JobError | None:
    if identity.may_manage(owner):
        return None
    return JobError(ErrorCode.NOT_OWNER, f"name: the voice {name!r} was registered by another "
                    "client; only it or an admin may replace or remove it", "name")

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
from cosyvoiced.job import ErrorCode, JobError
from cosyvoiced.protocol import quoted


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

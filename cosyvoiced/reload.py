"""What a SIGHUP can change in a running daemon, and what needs a restart."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from cosyvoiced import logs
from cosyvoiced.config import Config, ConfigError, load

log = logs.get_logger("cosyvoiced.supervisor")

# Bound at start-up: sockets, files and directories already open or bound.
RESTART_KEYS = frozenset({
    "spool.dir", "log.file", "log.max_bytes", "log.backups", "zmq.bind", "zmq.curve",
    "zmq.server_secret_key", "zmq.max_header_bytes", "zmq.max_attachment_bytes",
    "zmq.handshake_timeout_s", "metrics.listen", "metrics.allow_remote",
    "metrics.header_timeout_s", "metrics.idle_timeout_s", "metrics.max_connections",
    "http.listen", "http.max_body_bytes", "http.allow_insecure", "http.header_timeout_s",
    "http.idle_timeout_s", "http.max_connections", "wyoming.listen", "wyoming.allow_remote",
    # The Redis link's threads and keys are set up once.
    "cluster.redis", "cluster.password_file", "cluster.name", "cluster.key_prefix",
    "cluster.claim_idle_s", "cluster.outcome_ttl_s", "cluster.max_outcomes",
})


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # the new config, with restart-only keys kept at their running values
    applied: list[str]
    restart_required: list[str]

    @property
    def engine_changed(self) -> bool:
        """Engine or voice settings changed: the worker must be recycled to load them."""
        return any(key.startswith("engine.") for key in self.applied)


def flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} for every leaf of a config dataclass."""
    flat: dict[str, Any] = {}
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        key = prefix + spec.name
        if is_dataclass(value):
            flat |= flatten(value, key + ".")
        else:
            flat[key] = value
    return flat


def _with(settings: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    inner = _with(getattr(settings, head), rest, value) if rest else value
    return replace(settings, **{head: inner})


def plan(running: Config, loaded: Config) -> ReloadPlan:
    before, after = flatten(running), flatten(loaded)
    changed = sorted(key for key in after if after[key] != before[key])
    effective = loaded
    for key in changed:
        if key in RESTART_KEYS:
            effective = _with(effective, key.split("."), before[key])
    return ReloadPlan(effective, [k for k in changed if k not in RESTART_KEYS],
                      [k for k in changed if k in RESTART_KEYS])


def read(running: Config, path: str | None) -> ReloadPlan:
    """The plan for the config at `path`; ConfigError (the running config is kept) if it
    cannot be read or is not valid."""
    if path is None:
        raise ConfigError("no config file to re-read")
    return plan(running, load(path))


def report(applied: ReloadPlan, workers: int) -> None:
    log.info("reloaded", applied=applied.applied, restart_required=applied.restart_required,
             recycle_worker=applied.engine_changed, workers=workers)
    if applied.restart_required:
        log.warning("restart_required", keys=applied.restart_required,
                    message="these keys keep their old values until a restart")

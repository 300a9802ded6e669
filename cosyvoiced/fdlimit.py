"""The daemon's file descriptor limit, set once at start.

Each connection an intake holds is a descriptor. A process starts with a soft limit of
often 1,024 whatever its hard limit allows (systemd's default), so the daemon raises its
soft limit to the hard one, as nginx's `worker_rlimit_nofile` and most servers do; the
unit's `LimitNOFILE=` sets the hard limit. If the intakes' connection caps together, plus
the daemon's own descriptors, still do not fit, one warning says so at start: past the
limit, accept() fails (EMFILE) before any cap refuses a connection with its own answer.

`plan` is the decision, a pure function; `raise_soft_limit` applies it to this process.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from cosyvoiced import logs
from cosyvoiced.config import Config

# The daemon's own descriptors besides its connections: the log, the spool and cache
# files in hand, worker and encoder pipes, the notify and ZeroMQ internal sockets.
OWN_DESCRIPTORS = 64

log = logs.get_logger("cosyvoiced.supervisor")


@dataclass(frozen=True)
class Plan:
    soft: int  # the soft limit to set (the hard one, when it is finite)
    needed: int  # what the connection caps and the daemon's own descriptors may take

    @property
    def enough(self) -> bool:
        return self.needed <= self.soft


def connection_caps(settings: Config) -> dict[str, int]:
    """The connection cap of every intake that is on, by its config section."""
    caps = {"http": (settings.http.listen, settings.http.max_connections),
            "wyoming": (settings.wyoming.listen, settings.wyoming.max_connections),
            "zmq": (settings.zmq.bind, settings.zmq.max_connections),
            "metrics": (settings.metrics.listen, settings.metrics.max_connections)}
    return {name: cap for name, (on, cap) in caps.items() if on}


def plan(soft: int, hard: int, caps: dict[str, int]) -> Plan:
    """The soft limit to run with, given the process's limits (RLIM_INFINITY: none)."""
    needed = sum(caps.values()) + OWN_DESCRIPTORS
    if hard == resource.RLIM_INFINITY:  # the kernel's nr_open still bounds it: ask no more
        return Plan(max(soft, needed), needed)
    return Plan(max(soft, hard), needed)


def raise_soft_limit(settings: Config) -> Plan:
    """Raise this process's soft RLIMIT_NOFILE (the workers inherit it); warn once if the
    connection caps do not fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    caps = connection_caps(settings)
    decided = plan(soft, hard, caps)
    if decided.soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (decided.soft, hard))
        except (ValueError, OSError) as error:  # over the kernel's nr_open: keep what we had
            log.warning("descriptor_limit_not_raised", soft=soft, wanted=decided.soft,
                        error=str(error))
            decided = Plan(soft, decided.needed)
        else:
            log.info("descriptor_limit_raised", was=soft, soft=decided.soft, hard=hard)
    if not decided.enough:
        log.warning("descriptor_limit_low", soft=decided.soft, hard=hard,
                    needed=decided.needed, caps=caps,
                    message="the connection caps and the daemon's own descriptors may not "
                            "fit under the file limit: raise LimitNOFILE= in the unit, or "
                            "lower the max_connections settings")
    return decided

"""`cosyvoiced`: run the daemon in the foreground (systemd supervises; no self-daemonizing)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from cosyvoiced import __version__, config, cpuflags, fdlimit, logs, memory
from cosyvoiced.engines import exports, probe
from cosyvoiced.supervisor import EXIT_CONFIG, EXIT_WORKER_START, Supervisor

DEFAULT_CONFIG = "/etc/cosyvoiced/cosyvoiced.toml"
EXIT_CRASHED = 5  # the supervisor's own code raised: exit now, systemd restarts the service

log = logs.get_logger("cosyvoiced.supervisor")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cosyvoiced", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"TOML config file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config file (and that the engine's code imports), "
                             "print the outcome and exit")
    parser.add_argument("--version", action="version", version=f"cosyvoiced {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as error:
        print(f"cosyvoiced: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    unwritable = _unwritable(settings)
    for problem in unwritable:
        print(f"cosyvoiced: config error: {problem}", file=sys.stderr)
    if unwritable:
        return EXIT_CONFIG
    if args.check_config:
        return _check(args.config, settings)
    logs.configure_supervisor(settings.log)
    fdlimit.raise_soft_limit(settings)  # before any listener or worker: they inherit it
    memory.return_big_buffers_to_the_system()  # the supervisor holds audio in flight
    try:
        return Supervisor(settings, args.config).run()
    except Exception:  # noqa: BLE001 - a bug of ours: say so, and end the process now
        _crashed()


def _unwritable(settings: config.Config) -> list[str]:
    """The directories the daemon must write that this user cannot: a path outside the
    unit's own under ProtectSystem=strict, another user's. Said as a config error (exit 2,
    which the unit does not restart), before anything starts: an unwritable spool.dir was
    "a bug in the daemon" (exit 5, restarted until the unit's start limit), an unwritable
    log.file a traceback (exit 1)."""
    wanted = {"spool.dir": settings.spool.dir}
    if settings.log.file:
        wanted["log.file"] = os.path.dirname(os.path.abspath(settings.log.file))
    problems = []
    for key, path in wanted.items():
        existing = _nearest_existing(path)
        if not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{key}: {path!r} cannot be written by this user (uid "
                            f"{os.getuid()}): {existing!r} is not writable for it")
    return problems


def _nearest_existing(path: str) -> str:
    """`path`, or the nearest directory above it that exists (the daemon makes the rest)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _crashed() -> NoReturn:
    """The tick raised. A normal exit would wait for the intakes' threads and the worker
    processes, which go on without a supervisor, and the signal handlers only record: the
    process would hang half alive, deaf to SIGTERM. So it ends at once; the workers and the
    encoder die with it (PDEATHSIG), and the jobs in hand are recovered from the spool at the
    next start, as after any crash."""
    log.critical("supervisor_crashed", exit_code=EXIT_CRASHED, exc_info=True,
                 message="a bug in the daemon: exiting at once so that the service manager "
                         "restarts it; jobs in progress are recovered at the next start")
    logging.shutdown()  # flush the log before the hard exit
    sys.stdout.flush()
    os._exit(EXIT_CRASHED)


def _check(path: str, settings: config.Config) -> int:
    """--check-config: a valid file, and an engine whose code imports in this install (what a
    worker would fail on first, with the same error and exit code as the service)."""
    if settings.engine.name == "cosyvoice":
        # Before the probe: these need no import, and say more than a failed one would.
        unmet = exports.machine_problems(settings.engine.cosyvoice, settings.worker.devices)
        if settings.engine.cosyvoice.cpu_bf16 and "cpu" in settings.worker.devices:
            bf16_problem = cpuflags.bf16_problem()
            if bf16_problem is not None:
                unmet.append(bf16_problem)
        for need in unmet:
            print(f"cosyvoiced: {path}: the cosyvoice engine cannot load: {need}",
                  file=sys.stderr)
        if unmet:
            return EXIT_WORKER_START
        problem = probe.check(settings.engine.cosyvoice.repo)
        if problem is not None:
            print(f"cosyvoiced: {path}: the cosyvoice engine cannot load: {problem}",
                  file=sys.stderr)
            return EXIT_WORKER_START
    print(f"cosyvoiced: {path}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

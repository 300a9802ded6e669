"""`cosyvoicectl`: the operator's client (drop folder commands for now)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cosyvoiced import config
from cosyvoiced.daemon import DEFAULT_CONFIG
from cosyvoiced.job import new_job_id
from cosyvoiced.spool import RECORD_SUFFIX, Spool, atomic_write


def _spool(args: argparse.Namespace) -> Spool:
    if args.spool:
        return Spool(args.spool)
    return Spool(config.load(args.config).spool.dir)


def _drop(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    job = {"text": text} | {key: value for key, value in (
        ("voice", args.voice), ("format", args.format), ("output", args.output),
        ("speed", args.speed), ("sample_rate", args.sample_rate)) if value is not None}
    name = args.name or f"ctl-{new_job_id()}"
    output = job.get("output", name)
    spool = _spool(args)
    atomic_write(spool.inbox, f"{name}.json", json.dumps(job).encode())
    if not args.wait:
        print(spool.inbox / f"{name}.json")
        return 0
    return _await(spool, name, str(output), args.wait)


def _await(spool: Spool, name: str, output: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    record = spool.outbox / (output + RECORD_SUFFIX)
    error = spool.failed / f"{name}.json.error.json"
    while time.monotonic() < deadline:
        if record.exists():
            print(spool.outbox / json.loads(record.read_text())["file"])
            return 0
        if error.exists():
            detail = json.loads(error.read_text())
            print(f"cosyvoicectl: job failed: {detail['code']}: {detail['message']}",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"cosyvoicectl: no outcome within {timeout_s:g} s", file=sys.stderr)
    return 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoicectl", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="daemon config (for the spool)")
    parser.add_argument("--spool", help="spool directory (overrides --config)")
    commands = parser.add_subparsers(dest="command", required=True)
    drop = commands.add_parser("drop", help="drop a job into the inbox")
    drop.add_argument("text", help="text to speak, or - to read it from stdin")
    drop.add_argument("--name", help="job file name without extension (default: generated)")
    drop.add_argument("--voice")
    drop.add_argument("--format", choices=("wav", "flac", "ogg"))
    drop.add_argument("--output", help="base name of the result in the outbox")
    drop.add_argument("--speed", type=float)
    drop.add_argument("--sample-rate", type=int)
    drop.add_argument("--wait", type=float, metavar="SECONDS",
                      help="wait for the outcome and print the result's path")
    drop.set_defaults(handler=_drop)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except config.ConfigError as error:
        print(f"cosyvoicectl: config error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"cosyvoicectl: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`cosyvoicectl`: the operator's client, over ZeroMQ (and the drop folder for `drop`).

Exit codes scripts can rely on: 0 done; 1 the daemon answered with an error (printed as
`cosyvoicectl: CODE: message`); 2 bad usage or config; 3 no answer in time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import soundfile
import zmq.auth

from cosyvoiced import config
from cosyvoiced.client import DEFAULT_ENDPOINT, Client, DaemonError, NoReply, load_keypair
from cosyvoiced.daemon import DEFAULT_CONFIG
from cosyvoiced.job import new_job_id
from cosyvoiced.spool import ERROR_SUFFIX, RECORD_SUFFIX, Spool, atomic_write

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3


class UsageError(Exception):
    pass


def _spool(args: argparse.Namespace) -> Spool:
    if args.spool:
        return Spool(args.spool)
    return Spool(config.load(args.config, validate=False).spool.dir)


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return str(args.endpoint)
    if not Path(args.config).is_file():
        return DEFAULT_ENDPOINT
    settings = config.load(args.config, validate=False).zmq
    # Said at once: each was 30 s of retries to an address nothing answers on.
    if not settings.bind:
        raise UsageError(f"ZeroMQ is off in {args.config} (zmq.bind is empty); give "
                         "--endpoint")
    if settings.curve and not args.server_key:
        raise UsageError(f"the daemon of {args.config} requires CurveZMQ (zmq.curve): give "
                         "--server-key and --client-key")
    return settings.bind[0].replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:",
                                                                     "://127.0.0.1:")


def _client(args: argparse.Namespace) -> Client:
    server_key = None
    keypair = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            raise UsageError("CurveZMQ needs both --server-key and --client-key")
        server_key = load_keypair(args.server_key)[0]
        public, secret = load_keypair(args.client_key)
        if secret is None:
            raise UsageError(f"{args.client_key} holds no secret key (use NAME.key_secret)")
        keypair = (public, secret)
    endpoint = _endpoint(args)
    # This host's admin token goes to this host's daemon only: it was sent (in clear
    # without CURVE) to whatever --endpoint named.
    local = args.endpoint is None or config.is_loopback_endpoint(endpoint)
    token = _admin_token(args) if local else None
    return Client(endpoint, server_key=server_key, client_keypair=keypair,
                  timeout_s=args.timeout, admin_token=token)


def _admin_token(args: argparse.Namespace) -> str | None:
    """The daemon's admin token, where this user may read it (root, or the daemon's own
    user on its host): then every job may be seen and cancelled, as an operator expects."""
    if not Path(args.config).is_file():
        return None
    try:
        spool = Spool(config.load(args.config, validate=False).spool.dir)
        return spool.admin_token_path.read_text().strip() or None
    except (OSError, config.ConfigError):
        return None


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("voice", "format", "speed", "sample_rate", "output", "prompt_text", "instruct",
             "language")
    return {name: getattr(args, name) for name in names
            if getattr(args, name, None) is not None}


def _prompt_audio(args: argparse.Namespace) -> bytes | None:
    return None if args.prompt_audio is None else Path(args.prompt_audio).read_bytes()


# -- drop folder --------------------------------------------------------------------------
def _drop(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    job = {"text": text} | _options(args)
    name = args.name or f"ctl-{new_job_id()}"
    spool = _spool(args)
    if args.prompt_audio is not None:  # first: the job file names it
        prompt = Path(args.prompt_audio)
        job["prompt_audio"] = f"{name}{prompt.suffix.lower() or '.wav'}"
        atomic_write(spool.inbox, job["prompt_audio"], prompt.read_bytes())
    outcomes = _Outcomes(spool, f"{name}.json", str(job.get("output", name)))
    atomic_write(spool.inbox, f"{name}.json", json.dumps(job).encode())
    if not args.wait:
        print(spool.inbox / f"{name}.json")
        return 0
    return _await(outcomes, args.wait)


class _Outcomes:
    """The records that may end one dropped input: its output's (OUT.json, or OUT-JOBID.json
    when another job has OUT) and its error records (NAME.error.json, or JOBID~NAME...). Those
    already there when it is dropped are an earlier input's of the same name."""

    def __init__(self, spool: Spool, input_name: str, output: str) -> None:
        self._input = input_name
        self.outbox = spool.outbox
        self._patterns = (
            str(spool.outbox / f"{glob.escape(output)}*{RECORD_SUFFIX}"),
            str(spool.failed / f"*{glob.escape(input_name)}*{ERROR_SUFFIX}"))
        self._earlier = set(self._records())

    def _records(self) -> list[str]:
        return [path for pattern in self._patterns for path in glob.glob(pattern)]

    def new(self) -> dict[str, Any] | None:
        """This input's record once it is written: the result's or the error's."""
        for path in self._records():
            if path in self._earlier:
                continue
            try:
                record = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("input") == self._input:
                return record
        return None


def _await(outcomes: _Outcomes, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = outcomes.new()
        if record is not None and "file" in record:
            print(outcomes.outbox / record["file"])
            return 0
        if record is not None:
            print(f"cosyvoicectl: job failed: {record['code']}: {record['message']}",
                  file=sys.stderr)
            return EXIT_ERROR
        time.sleep(0.05)
    print(f"cosyvoicectl: no outcome within {timeout_s:g} s", file=sys.stderr)
    return EXIT_NO_REPLY


# -- ZeroMQ -------------------------------------------------------------------------------
def _ping(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.ping())
    return 0


def _voices(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for voice in client.voices():
            print(f"{voice['name']}\t{voice['language']}\t{voice['sample_rate']}\t"
                  f"{voice['engine']}\t{voice.get('kind', 'builtin')}")
    return 0


def _voice_add(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.register_voice(args.name, Path(args.audio).read_bytes(), args.text))
    return 0


def _voice_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.remove_voice(args.name))
    return 0


def _wav_stream_header(sample_rate: int) -> bytes:
    """A WAV header for a stream of unknown length (players read to the end of the pipe)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def _say(args: argparse.Namespace) -> int:
    if args.output_file is None and sys.stdout.isatty() and not args.play_to_stdout:
        raise UsageError("say: give -o FILE, or --play-to-stdout and pipe it (| aplay)")
    options = {k: v for k, v in _options(args).items() if k != "format"}
    started = time.monotonic()
    with _client(args) as client, client.stream(args.text, _prompt_audio(args),
                                                **options) as stream:
        first: float | None = None
        if args.output_file is not None:
            sink = None
            for pcm in stream:
                first = first or time.monotonic() - started
                if sink is None:
                    sink = soundfile.SoundFile(args.output_file, "w",
                                               samplerate=stream.start["sample_rate"],
                                               channels=1, subtype="PCM_16")
                sink.buffer_write(pcm, dtype="int16")
            if sink is not None:
                sink.close()
        else:
            out: BinaryIO = sys.stdout.buffer
            for pcm in stream:
                if first is None:
                    first = time.monotonic() - started
                    if not args.raw:
                        out.write(_wav_stream_header(stream.start["sample_rate"]))
                out.write(pcm)
                out.flush()
        end = stream.end or {}
    print(f"cosyvoicectl: job {stream.start.get('job')}: {end.get('audio_s', 0):.2f} s of "
          f"audio at {stream.start.get('sample_rate')} Hz, first audio after "
          f"{(first or 0) * 1000:.0f} ms", file=sys.stderr)
    return 0


def _submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.submit(args.text, _prompt_audio(args), **_options(args)))
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.status(args.job))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.cancel(args.job))
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.stats())
    return 0


def _keygen(args: argparse.Namespace) -> int:
    """A CURVE key pair; the secret readable by its owner only (pyzmq writes it with the
    umask's 0644: any local user could read the server's secret and pass for it). For the
    daemon: `chown root:cosyvoiced` and `chmod 0640` it."""
    directory = Path(args.dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    umask = os.umask(0o077)  # never readable by others, not even for a moment
    try:
        public, secret = zmq.auth.create_certificates(str(directory), args.name)
    finally:
        os.umask(umask)
    Path(public).chmod(0o644)
    print(f"public key (share it): {public}\nsecret key (keep it):  {secret}")
    return 0


def _job_options(parser: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    parser.add_argument("--voice")
    if formats:
        parser.add_argument("--format", choices=formats)
    parser.add_argument("--speed", type=float)
    parser.add_argument("--sample-rate", type=int)
    parser.add_argument("--prompt-audio", metavar="FILE",
                        help="clone the voice of this recording (cosyvoice engine)")
    parser.add_argument("--prompt-text", help="the words spoken in --prompt-audio")
    parser.add_argument("--instruct", help="how to speak, e.g. 'Speak cheerfully.'")
    parser.add_argument("--language", help="target language tag: zh, en, jp, yue, ko")


def _command(commands: Any, name: str, handler: Callable[[argparse.Namespace], int],
             helptext: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=helptext,
                                                          description=helptext)
    parser.set_defaults(handler=handler)
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoicectl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="daemon config, for the spool and the endpoint")
    parser.add_argument("--spool", help="spool directory (overrides --config)")
    parser.add_argument("--endpoint", help=f"ZeroMQ endpoint (default: the config's first "
                        f"zmq.bind, else {DEFAULT_ENDPOINT})")
    parser.add_argument("--server-key", help="the daemon's public key file (CurveZMQ)")
    parser.add_argument("--client-key", help="our secret key file, NAME.key_secret (CurveZMQ)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per reply")
    commands = parser.add_subparsers(dest="command", required=True)

    drop = _command(commands, "drop", _drop, "drop a job into the inbox (no ZeroMQ)")
    drop.add_argument("text", help="text to speak, or - to read it from stdin")
    drop.add_argument("--name", help="job file name without extension (default: generated)")
    drop.add_argument("--output", help="base name of the result in the outbox")
    drop.add_argument("--wait", type=float, metavar="SECONDS",
                      help="wait for the outcome and print the result's path")
    _job_options(drop, ("wav", "flac", "ogg"))

    _command(commands, "ping", _ping, "check that the daemon answers")
    _command(commands, "voices", _voices, "list voices: name, language, rate, engine")
    say = _command(commands, "say", _say, "speak TEXT now, streaming")
    say.add_argument("text")
    say.add_argument("-o", "--output-file", help="write the audio here (.wav, .flac, .ogg)")
    say.add_argument("--play-to-stdout", action="store_true",
                     help="write WAV to stdout as it arrives (| aplay)")
    say.add_argument("--raw", action="store_true", help="with --play-to-stdout: raw s16le PCM")
    _job_options(say, ())
    submit = _command(commands, "submit", _submit, "queue a job for the outbox; prints its id")
    submit.add_argument("text")
    submit.add_argument("--output", help="base name of the result in the outbox")
    _job_options(submit, ("wav", "flac", "ogg"))
    for name, handler, helptext in (("status", _status, "show a job's state"),
                                    ("cancel", _cancel, "cancel a queued or running job")):
        _command(commands, name, handler, helptext).add_argument("job")
    _command(commands, "stats", _stats, "queue, worker and job counters")
    voice = _command(commands, "voice", lambda _args: 0, "register or remove a cloned voice")
    voice_commands = voice.add_subparsers(dest="voice_command", required=True)
    add = _command(voice_commands, "add", _voice_add, "register NAME from a recording")
    add.add_argument("name")
    add.add_argument("--audio", required=True, help="the recording (1-30 s, any format)")
    add.add_argument("--text", required=True, help="the words spoken in it")
    _command(voice_commands, "rm", _voice_rm, "remove a registered voice").add_argument("name")
    keygen = _command(commands, "keygen", _keygen, "write a CurveZMQ keypair into DIR")
    keygen.add_argument("dir")
    keygen.add_argument("--name", default="client", help="file name stem (default: client)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DaemonError as error:
        print(f"cosyvoicectl: {error.code}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except NoReply as error:
        print(f"cosyvoicectl: {error}", file=sys.stderr)
        return EXIT_NO_REPLY
    except (config.ConfigError, UsageError) as error:
        print(f"cosyvoicectl: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"cosyvoicectl: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""Run the real daemon as a subprocess on a temp spool and watch it like systemd would."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from tests.audiofile import read_audio

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 60.0
POLL_S = 0.02
# wait_until polls at POLL_S at first, then less often, up to this: a condition that reads a
# spool or a log is work stolen from the daemons on the same 2 cores.
LONGEST_POLL_S = 0.1


@functools.cache
def _short_root() -> str:
    """This test process's directory for socket paths, removed when the process exits."""
    root, owner = tempfile.mkdtemp(prefix="cvd-"), os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked child that exits through Python
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(remove)
    return root


def short_dir() -> str:
    """A new directory for a socket: AF_UNIX and ipc:// paths are limited to 108 bytes, so
    it is short, outside pytest's tmp tree. Every test process's are removed when it exits
    (a directory each, kept, left 14,000 in the machine's temp directory)."""
    return tempfile.mkdtemp(dir=_short_root())


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bounded(action: Callable[[], object], timeout_s: float) -> float:
    """Run `action` on a thread; fail (rather than hang the test) if it takes longer.
    Returns how long it took."""
    began = time.monotonic()
    worker = threading.Thread(target=action, daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), f"still blocked after {timeout_s:g} s"
    return time.monotonic() - began


@contextlib.contextmanager
def out_of_descriptors(daemon: Daemon, port: int, spare: int = 8,
                       connections: int = 40) -> Iterator[None]:
    """Lower the running daemon's descriptor limit to what it uses plus `spare`, then open
    more loopback connections to `port` than that leaves: accept() fails with EMFILE.
    The connections are closed on leaving."""
    assert daemon.process is not None
    pid = daemon.process.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + spare, hard))
    held: list[socket.socket] = []
    try:
        for _ in range(connections):
            sock = socket.socket()
            sock.settimeout(0.5)
            with contextlib.suppress(OSError):
                sock.connect(("127.0.0.1", port))
            held.append(sock)
        yield
    finally:
        for sock in held:
            sock.close()


def thread_fault(fault: str, **settings: str) -> dict[str, str]:
    """The environment that turns on `fault` of tests/thread_faults/sitecustomize.py (with
    its COSYVOICED_TEST_* `settings`) in every Python process started with it."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "thread_faults"), str(REPO)]),
            "COSYVOICED_TEST_THREAD_FAULT": fault, **settings}


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM): what a burst made it hold."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def pipelined(endpoint: str, connections: int, requests_each: int,
              request: dict[str, Any]) -> list[zmq.Socket[bytes]]:
    """`connections` ZeroMQ DEALERs, each sending `requests_each` copies of `request` at
    once (ids "<connection>-<n>"; JSON as UTF-8, so a "。" is 3 bytes, not 6). The caller
    reads the replies and closes them (linger 0)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealers = [context.socket(zmq.DEALER) for _ in range(connections)]
    for number, dealer in enumerate(dealers):
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        for n in range(requests_each):
            dealer.send(json.dumps(request | {"id": f"{number}-{n}"},
                                   ensure_ascii=False).encode())
    return dealers


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    pause_s = POLL_S
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(pause_s)
        pause_s = min(pause_s * 1.25, LONGEST_POLL_S)


class NotifySocket:
    """A real AF_UNIX datagram socket, bound where $NOTIFY_SOCKET points, read as systemd does.

    A thread keeps reading, like the service manager, so the daemon is never throttled by
    a full socket buffer the test forgot to drain.
    """

    def __init__(self) -> None:
        self._dir = short_dir()
        self.path = os.path.join(self._dir, "notify")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.path)
        self._socket.settimeout(0.1)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, str]] = []
        self._open = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self._messages.extend((now, line) for line in data.decode().splitlines())

    @property
    def messages(self) -> list[str]:
        with self._lock:
            return [line for _, line in self._messages]

    def times(self, line: str) -> list[float]:
        with self._lock:
            return [at for at, seen in self._messages if seen == line]

    def seen(self, line: str) -> bool:
        return line in self.messages

    def wait_for(self, line: str, timeout_s: float) -> None:
        wait_until(lambda: self.seen(line), timeout_s, f"{line} on NOTIFY_SOCKET")

    def count(self, line: str) -> int:
        return self.messages.count(line)

    def statuses(self) -> list[str]:
        return [m.removeprefix("STATUS=") for m in self.messages if m.startswith("STATUS=")]

    def close(self) -> None:
        self._open = False
        self._reader.join(timeout=2)
        self._socket.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


class LogReader:
    """A JSON-lines log read as it grows: tests poll it many times a second, and a daemon's
    debug log grows to megabytes, so each line is parsed once. Only the current file counts
    (after a rotation, the new one from its start)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._inode = -1
        self._offset = 0
        self._events: list[dict[str, Any]] = []

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        self._read_new_lines()
        return [e for e in self._events if event is None or e["event"] == event]

    def _read_new_lines(self) -> None:
        try:
            with self._path.open("rb") as log:
                info = os.fstat(log.fileno())
                if info.st_ino != self._inode or info.st_size < self._offset:
                    self._inode, self._offset, self._events = info.st_ino, 0, []
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            self._inode, self._offset, self._events = -1, 0, []
            return
        # Up to the last newline: a line the daemon is writing now is read next time.
        whole = data[:data.rfind(b"\n") + 1]
        self._offset += len(whole)
        self._events.extend(json.loads(line) for line in whole.splitlines() if line)


class Daemon:
    """One cosyvoiced process on `root`; may be restarted on the same spool."""

    def __init__(self, root: Path, **sections: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.spool = root / "spool"
        self.inbox = self.spool / "inbox"
        self.outbox = self.spool / "outbox"
        self.failed = self.spool / "failed"
        self.work = self.spool / "work"
        self.log_file = root / "log" / "cosyvoiced.log"
        self._log = LogReader(self.log_file)
        self._record_inputs: dict[Path, str] = {}
        self.config_path = root / "cosyvoiced.toml"
        self.cache_dir = root / "cache"
        self.endpoint = f"ipc://{short_dir()}/zmq"
        self.configure(**sections)
        self.process: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        self.runs = 0

    def configure(self, **sections: dict[str, Any]) -> None:
        """(Re)write the config file: this daemon's paths, plus `sections` (a__b is a.b); a
        key given as None is left out, so the daemon's own default applies."""
        settings: dict[str, dict[str, Any]] = {
            "spool": {"dir": str(self.spool)},
            "log": {"file": str(self.log_file), "level": "debug"},
            "zmq": {"bind": [self.endpoint]},
            # Off unless a test turns it on: most tests need real synthesis of texts they
            # repeat. Under the test's root either way, never the system's /var/cache.
            "cache": {"dir": str(self.cache_dir), "max_bytes": 0},
            # Registered voices under the test's root too: the default is the system's
            # /var/lib/cosyvoiced, which every test daemon shared (a test that registered
            # 8 anonymous voices there made the next one's `forbidden`, run after run).
            "engine.cosyvoice": {"speakers_file": str(self.root / "state" / "speakers.json")},
            # One worker unless a test asks for more (the default, "auto", is one per core
            # for Piper): most tests follow the worker, its generations and its memory.
            "worker": {"per_device": 1},
        }
        for section, values in sections.items():
            settings.setdefault(section.replace("__", "."), {}).update(values)
        for values in settings.values():
            for key in [key for key, value in values.items() if value is None]:
                del values[key]
        write_config(self.config_path, settings)

    def start(self, extra_env: dict[str, str] | None = None, wait_ready: bool = True,
              journal: bool = False, nofile: tuple[int, int] | None = None,
              wrapper: tuple[str, ...] = ()) -> None:
        """Start it; `journal` makes stdout look like journald's stream ($JOURNAL_STREAM);
        `nofile`: the (soft, hard) file limit it starts with, as a unit's LimitNOFILE=;
        `wrapper`: a command that execs it (unshare, as a unit's PrivateUsers=)."""
        self.notify = NotifySocket()
        self.runs += 1
        stdout = (self.root / f"stdout.{self.runs}.log").open("wb")
        # The repository on the path, for the fault-injecting engines under tests/.
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path, PYTHONPATH=str(REPO))
        env.update(extra_env or {})
        env.pop("JOURNAL_STREAM", None)
        if journal:
            info = os.fstat(stdout.fileno())
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        # util-linux's prlimit sets the limits, then execs the daemon: the same pid.
        limits = ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}", "--"] if nofile else []
        self.process = subprocess.Popen(
            [*wrapper, *limits, sys.executable, "-m", "cosyvoiced", "--config",
             str(self.config_path)],
            env=env, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        stdout.close()
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.notify is not None
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.notify.seen("READY=1"):
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode} before "
                                     f"READY=1:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no READY=1 within {STARTUP_TIMEOUT_S:g} s")
            time.sleep(POLL_S)

    def admin_token(self) -> str:
        """What a local `cosyvoicectl` reads: a client with it may act on every job."""
        return (self.spool / "admin.token").read_text().strip()

    def output(self) -> str:
        return (self.root / f"stdout.{self.runs}.log").read_text(errors="replace")

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON lines of the log file; only those of `event`, if given."""
        return self._log.events(event)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def kill_hard(self) -> None:
        """SIGKILL the supervisor only (its worker dies with it via PDEATHSIG)."""
        self.signal(signal.SIGKILL)
        self.wait_exit()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    # -- the drop folder ------------------------------------------------------------------
    def drop(self, name: str, content: str | bytes, how: str = "rename") -> None:
        data = content.encode() if isinstance(content, str) else content
        if how == "rename":
            temp = self.inbox / f".{name}.tmp"
            temp.write_bytes(data)
            os.rename(temp, self.inbox / name)
        elif how == "inplace":
            with (self.inbox / name).open("wb") as stream:
                half = len(data) // 2
                stream.write(data[:half])
                stream.flush()
                time.sleep(0.2)  # a slow writer: the daemon must wait for the close
                stream.write(data[half:])
        else:
            raise ValueError(how)

    def drop_job(self, name: str, **fields: Any) -> None:
        self.drop(f"{name}.json", json.dumps(fields))

    def outcome(self, input_name: str) -> tuple[str, dict[str, Any]] | None:
        """("done", record) or ("failed", error record) for an input, once it has one."""
        error = self.failed / f"{input_name}.error.json"
        if error.exists():
            return "failed", json.loads(error.read_text())
        for record_path in self.outbox.glob("*.json"):
            if self._input_of(record_path) == input_name:
                current = _read_json(record_path)
                if current is not None:
                    return "done", current
        return None

    def outcome_counts(self) -> Counter[str]:
        """How many outcome records each input has, across outbox/ and failed/."""
        paths = [*self.outbox.glob("*.json"), *self.failed.glob("*.error.json")]
        return Counter(name for name in map(self._input_of, paths) if name is not None)

    def _input_of(self, record_path: Path) -> str | None:
        """The input a record belongs to; None while it is being written. Tests poll this
        many times a second, and a record is written once (by rename): each is read once."""
        if record_path not in self._record_inputs:
            record = _read_json(record_path)
            if record is None or not isinstance(record.get("input"), str):
                return None
            self._record_inputs[record_path] = record["input"]
        return self._record_inputs[record_path]

    def wait_outcome(self, input_name: str,
                     timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, dict[str, Any]]:
        outcome: tuple[str, dict[str, Any]] = wait_until(
            lambda: self.outcome(input_name), timeout_s, f"an outcome for {input_name}")
        return outcome

    def wait_done(self, input_name: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        kind, record = self.wait_outcome(input_name, timeout_s)
        assert kind == "done", f"{input_name} failed: {record}"
        return record

    def wait_failed(self, input_name: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        kind, record = self.wait_outcome(input_name, timeout_s)
        assert kind == "failed", f"{input_name} did not fail: {record}"
        return record


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def assert_speech(path: Path, sample_rate: int, text: str, speed: float = 1.0) -> float:
    """The file is real speech: right rate, duration in proportion to the text, not silence."""
    samples, rate = read_audio(path)  # a streamed FLAC or AAC too (PyAV)
    assert rate == sample_rate, f"{path.name}: {rate} Hz, expected {sample_rate}"
    assert samples.ndim == 1, f"{path.name}: not mono"
    duration = float(len(samples) / rate)
    per_char = duration * speed / max(1, len(text))
    # English speech runs at roughly 12-18 characters per second.
    assert 0.03 < per_char < 0.15, f"{path.name}: {duration:.2f} s for {len(text)} chars"
    rms = float(np.sqrt(np.mean(samples**2)))
    assert rms > 0.02, f"{path.name}: RMS {rms:.4f} is silence"
    return duration

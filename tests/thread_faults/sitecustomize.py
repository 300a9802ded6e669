"""Test doubles: a ZeroMQ socket thread that dies, for every Python process started with this
directory first on PYTHONPATH and $COSYVOICED_TEST_THREAD_FAULT=zmq (the other values below
are other faults of the supervisor's).

A request whose header holds KILL_THIS_THREAD raises, in the socket thread, an exception that
no handler of one message catches (as a bug in a library's thread would), so the thread
ends: the daemon must see it, say so and stop, never go on half deaf.
"""

import os

if os.environ.get("COSYVOICED_TEST_THREAD_FAULT") == "zmq":
    from cosyvoiced.intake import zmq as _zmq_intake

    class ThreadKilled(BaseException):
        """Not an Exception: it passes every `except Exception` on its way out."""

    _take = _zmq_intake._SocketThread._take

    def _take_or_die(self, frames, *rest):  # type: ignore[no-untyped-def]
        if frames and b"KILL_THIS_THREAD" in frames[-1]:
            raise ThreadKilled("a test double killed the zmq socket thread")
        return _take(self, frames, *rest)

    _zmq_intake._SocketThread._take = _take_or_die  # type: ignore[method-assign]

if os.environ.get("COSYVOICED_TEST_THREAD_FAULT") == "stall":
    # The supervisor's tick stands still while the file $COSYVOICED_TEST_TICK_STALL exists
    # (a tick stuck in a slow call): what the intakes' own threads answer meanwhile.
    import time

    from cosyvoiced import supervisor as _stalled

    _tick_on = _stalled.Supervisor.tick
    _stall = os.environ["COSYVOICED_TEST_TICK_STALL"]

    _standing = _stall + ".standing"  # exists while a tick stands still: tests wait for it

    def _tick_or_stall(self, now):  # type: ignore[no-untyped-def]
        if os.path.exists(_stall):
            open(_standing, "w").close()
            while os.path.exists(_stall):
                time.sleep(0.05)
            os.unlink(_standing)
        return _tick_on(self, now)

    _stalled.Supervisor.tick = _tick_or_stall  # type: ignore[method-assign]

if os.environ.get("COSYVOICED_TEST_THREAD_FAULT") == "tick":
    # The supervisor's tick raises once the file $COSYVOICED_TEST_TICK_CRASH exists (a bug
    # in the tick): the daemon must exit at once, never hang half alive ignoring SIGTERM.
    from cosyvoiced import supervisor as _supervisor

    _tick = _supervisor.Supervisor.tick
    _marker = os.environ["COSYVOICED_TEST_TICK_CRASH"]

    def _tick_or_crash(self, now):  # type: ignore[no-untyped-def]
        if os.path.exists(_marker):
            raise RuntimeError("a test double crashed the tick")
        return _tick(self, now)

    _supervisor.Supervisor.tick = _tick_or_crash  # type: ignore[method-assign]

if os.environ.get("COSYVOICED_TEST_THREAD_FAULT") == "commit":
    # The daemon dies (SIGKILL, as a native crash) just after it writes the result record
    # named $COSYVOICED_TEST_COMMIT_CRASH, before it releases the job's file in work/: the
    # window in which a job has ended but is still found in work/ at the next start.
    import signal

    from cosyvoiced import spool as _spool

    _atomic_write = _spool.atomic_write
    _record = os.environ["COSYVOICED_TEST_COMMIT_CRASH"]

    def _write_and_crash(directory, name, *rest, **options):  # type: ignore[no-untyped-def]
        written = _atomic_write(directory, name, *rest, **options)
        if name == _record:
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    _spool.atomic_write = _write_and_crash

if os.environ.get("COSYVOICED_TEST_THREAD_FAULT") == "slow_spawn":
    # Every process the daemon spawns (workers, the encoder) takes this long to start: a
    # supervisor killed meanwhile dies before its child could ask to die with it.
    import time

    with open("/proc/self/cmdline", "rb") as _cmdline:
        if b"--multiprocessing-fork" in _cmdline.read():
            time.sleep(float(os.environ["COSYVOICED_TEST_SPAWN_DELAY_S"]))

if os.environ.get("COSYVOICED_TEST_THREAD_FAULT") == "stop_mid_reply":
    # The encoder's child stops (SIGSTOP) partway through sending a reply of over 1 MiB, once
    # (the file $COSYVOICED_TEST_STOP_ONCE is made then): its parent is left mid-read.
    import signal
    import struct
    from multiprocessing import connection

    _send_bytes = connection.Connection._send_bytes  # type: ignore[attr-defined]
    _once = os.environ["COSYVOICED_TEST_STOP_ONCE"]

    def _stop_mid_reply(self, buf):  # type: ignore[no-untyped-def]
        if len(buf) > 1 << 20 and not os.path.exists(_once):
            open(_once, "w").close()
            self._send(struct.pack("!i", len(buf)))
            self._send(bytes(memoryview(buf)[:1 << 16]))
            os.kill(os.getpid(), signal.SIGSTOP)
        return _send_bytes(self, buf)

    connection.Connection._send_bytes = _stop_mid_reply  # type: ignore[attr-defined]

"""The prompt audio a CosyVoice worker writes for upstream, which reads prompts from a path
(since `622a3a1`), and what a killed worker left of them.

Each prompt (a request's, or a registered voice's as the worker loads it) is a file of its
own in the temp directory, named with the worker's pid, and deleted when it has been read.
A directory per worker (a `TemporaryDirectory` kept for the worker's life) was left behind
by every worker that did not exit through Python's own shutdown: a SIGTERM or SIGKILL at a
recycle or stop, or a crash. That was one directory per worker ever killed, for as long as
the temp directory lives (the whole uptime, for a unit with `PrivateTmp=`): the test suites
alone left 415. A file is left only when its worker dies while upstream reads it, and the
supervisor deletes those of a worker that did not exit cleanly once it has reaped it
(`remove_files_of`): its own child, whose pid is reused only by a process started since.
Nothing here imports torch: the supervisor uses it. A supervisor that is itself SIGKILLed
leaves its workers' files to the unit's `PrivateTmp=`, which goes when the service stops.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "cosyvoiced-prompt-"
SUFFIX = ".wav"


@contextlib.contextmanager
def prompt_file() -> Iterator[str]:
    """A new, empty file for one prompt (mode 0600); deleted when this ends."""
    with tempfile.NamedTemporaryFile(prefix=f"{PREFIX}{os.getpid()}-", suffix=SUFFIX) as file:
        yield file.name


def remove_files_of(pid: int, directory: Path | None = None) -> list[str]:
    """Delete the prompt files the worker `pid` left in `directory` (the temp directory by
    default): only regular files this user owns; their names."""
    prefix, removed = f"{PREFIX}{pid}-", []
    with os.scandir(directory or tempfile.gettempdir()) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(SUFFIX)):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError:  # gone meanwhile, or not ours to delete: left as it is
                continue
    return removed

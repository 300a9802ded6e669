"""The prompt audio a CosyVoice worker writes for upstream, which reads prompts from a path
(since `622a3a1`), and what a killed worker left of them.

Each prompt is a file of its own in the temp directory, named with the worker's pid, and
deleted when its request ends. A directory per worker (a `TemporaryDirectory` kept for the
worker's life) was left behind by every worker that did not exit through Python's own
shutdown: a SIGTERM or SIGKILL at a recycle or stop, or a crash. That was one directory
per worker ever killed, for as long as the temp directory lives (the whole uptime, for a
unit with `PrivateTmp=`): the test suites alone left 415. A file is left only when its
worker dies during a prompted request, and the next worker to start deletes the files of
workers that are gone (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "cosyvoiced-prompt-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[^/]*\.wav")


@contextlib.contextmanager
def prompt_file() -> Iterator[str]:
    """A new, empty file for one request's prompt (mode 0600); deleted when this ends."""
    with tempfile.NamedTemporaryFile(prefix=f"{PREFIX}{os.getpid()}-", suffix=".wav") as file:
        yield file.name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def orphans(directory: Path) -> list[Path]:
    """The prompt files in `directory` whose worker is gone."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _NAME.fullmatch(entry.name)
            if (match and entry.is_file(follow_symlinks=False)
                    and not _alive(int(match[1]))):
                found.append(Path(entry.path))
    return found


def remove_orphans(directory: Path | None = None) -> list[str]:
    """Delete the prompt files that workers killed during a prompted request left in
    `directory` (the temp directory by default); their names."""
    removed = []
    for path in orphans(Path(directory or tempfile.gettempdir())):
        with contextlib.suppress(FileNotFoundError):  # another worker took it first
            path.unlink()
            removed.append(path.name)
    return removed

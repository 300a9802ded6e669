"""The prompt files a CosyVoice worker writes for upstream (engines/promptfiles.py), and
those a killed worker left, deleted by the supervisor as it reaps the worker."""

from __future__ import annotations

import os
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from cosyvoiced.engines import promptfiles
from tests.conftest import DaemonFactory
from tests.daemon import wait_until

TONE = {"name": "tests.engines.faulty:load"}
NOBODY = 65534


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_a_prompt_file_is_named_for_its_worker_and_gone_when_read(temp_dir: Path) -> None:
    with promptfiles.prompt_file() as name:
        path = Path(name)
        assert path.parent == temp_dir
        assert path.name.startswith(f"{promptfiles.PREFIX}{os.getpid()}-")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.exists()


def test_only_the_regular_files_of_the_worker_and_this_user_are_removed(
        temp_dir: Path) -> None:
    pid = 4242
    left = temp_dir / f"{promptfiles.PREFIX}{pid}-abc.wav"
    kept = [temp_dir / f"{promptfiles.PREFIX}{pid + 1}-abc.wav",  # another worker's
            temp_dir / f"{promptfiles.PREFIX}{pid}1-abc.wav",  # pid 42421's
            temp_dir / f"{promptfiles.PREFIX}{pid}-abc.txt"]
    for path in (left, *kept):
        path.write_bytes(b"RIFF")
    target = temp_dir / "elsewhere"
    target.write_text("kept")
    link = temp_dir / f"{promptfiles.PREFIX}{pid}-link.wav"
    link.symlink_to(target)
    (temp_dir / f"{promptfiles.PREFIX}{pid}-dir.wav").mkdir()
    others = temp_dir / f"{promptfiles.PREFIX}{pid}-others.wav"
    others.write_bytes(b"RIFF")
    if os.geteuid() == 0:
        os.chown(others, NOBODY, NOBODY)
    else:
        others.unlink()

    assert promptfiles.remove_files_of(pid) == [left.name]
    assert all(path.exists() for path in kept)
    assert link.is_symlink()
    assert target.read_text() == "kept"
    assert (temp_dir / f"{promptfiles.PREFIX}{pid}-dir.wav").is_dir()


def test_the_prompt_files_of_a_killed_worker_are_removed_when_it_is_reaped(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A worker killed while upstream read a prompt left the file behind (and, before,
    the directory every worker kept for its prompts, killed or not: 415 on one machine)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    daemon = make_daemon(engine=TONE)
    daemon.start(extra_env={"TMPDIR": str(scratch)})
    (started,) = [e for e in daemon.log_events("worker_state") if e["state"] == "starting"]
    pid = started["worker_pid"]
    left = scratch / f"{promptfiles.PREFIX}{pid}-being-read.wav"
    left.write_bytes(b"RIFF")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not left.exists(), 30, "the killed worker's prompt file to go")
    (removed,) = daemon.log_events("prompt_files_removed")
    assert removed["files"] == [left.name]

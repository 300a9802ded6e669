"""The prompt files a CosyVoice worker writes for upstream, and the sweep of those that
killed workers left (engines/promptfiles.py): no processes but the one made to be gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cosyvoiced.engines import promptfiles


def _gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_prompt_file_is_named_for_its_worker_and_gone_when_its_request_ends() -> None:
    with promptfiles.prompt_file() as name:
        path = Path(name)
        assert path.name.startswith(f"{promptfiles.PREFIX}{os.getpid()}-")
        assert path.stat().st_mode & 0o777 == 0o600
        assert path not in promptfiles.orphans(path.parent), "its worker is alive"
    assert not path.exists()


def test_only_the_prompt_files_of_gone_workers_are_removed(tmp_path: Path) -> None:
    gone, alive = _gone_pid(), os.getpid()
    orphan = tmp_path / f"{promptfiles.PREFIX}{gone}-abc123.wav"
    in_use = tmp_path / f"{promptfiles.PREFIX}{alive}-def456.wav"
    someone_elses = tmp_path / f"other-{gone}-abc.wav"
    for path in (orphan, in_use, someone_elses):
        path.write_bytes(b"RIFF")
    target = tmp_path / "not-a-prompt"
    target.write_text("kept")
    link = tmp_path / f"{promptfiles.PREFIX}{gone}-link.wav"
    link.symlink_to(target)

    assert promptfiles.remove_orphans(tmp_path) == [orphan.name]
    assert not orphan.exists()
    assert in_use.exists()
    assert someone_elses.exists()
    assert link.is_symlink()
    assert target.read_text() == "kept"

"""A spool or log the daemon's user cannot write is a config error, said in one line before
anything starts (exit 2, which the unit does not restart). Run as an unprivileged user
(setpriv: root writes anywhere) that may still read and search every directory
(CAP_DAC_READ_SEARCH: the checkout may be root's alone), not write them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOBODY = "65534"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root, to run the daemon as another user")


def _as_nobody(tmp_path: Path, section: str) -> subprocess.CompletedProcess[str]:
    """The daemon, as nobody, with `section` pointing into a directory of root's."""
    (tmp_path / "roots").mkdir(mode=0o755)
    path = tmp_path / "c.toml"
    path.write_text(f'[zmq]\nbind = []\n[cache]\nmax_bytes = 0\n{section}\n')
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return subprocess.run([*as_nobody, sys.executable, "-m", "cosyvoiced", "--config",
                           str(path)], capture_output=True, text=True, timeout=60,
                          check=False, cwd=tmp_path)


def test_an_unwritable_spool_is_a_config_error(tmp_path: Path) -> None:
    """It was "a bug in the daemon" (supervisor_crashed, exit 5), restarted by the unit
    until its start limit."""
    run = _as_nobody(tmp_path, f'[spool]\ndir = "{tmp_path}/roots/spool"\n[log]\nfile = ""')
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"spool.dir: '{tmp_path}/roots/spool' cannot be written by this user" in run.stderr
    assert "supervisor_crashed" not in run.stdout


def test_an_unwritable_log_file_is_a_config_error(tmp_path: Path) -> None:
    """It was a traceback (PermissionError), exit 1."""
    (tmp_path / "spool").mkdir()
    os.chown(tmp_path / "spool", int(NOBODY), int(NOBODY))
    run = _as_nobody(tmp_path, f'[spool]\ndir = "{tmp_path}/spool"\n'
                               f'[log]\nfile = "{tmp_path}/roots/log/cosyvoiced.log"')
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "log.file:" in run.stderr
    assert "Traceback" not in run.stderr

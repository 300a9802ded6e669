"""The unit, sysusers and tmpfiles entries, checked with systemd's own offline tools.

No systemd manager is started: `systemd-analyze verify/security --offline`,
`systemd-sysusers --root` and `systemd-tmpfiles --root` work on files and a throwaway root.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cosyvoiced.config import HttpConfig, MetricsConfig, WyomingConfig, ZmqConfig
from tests.daemon import wait_until

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd tools are not installed")


def _root_with_unit(root: Path, drop_in: bool = False) -> Path:
    """A minimal root: the distribution's units, our unit, and its two executables."""
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(UNITS / "cosyvoiced.service", root / "usr/lib/systemd/system")
    for program in ("cosyvoiced", "kill"):
        path = root / "usr/bin" / program
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    if drop_in:
        target = root / "etc/systemd/system/cosyvoiced.service.d/gpu.conf"
        target.parent.mkdir(parents=True)
        shutil.copy(UNITS / "cosyvoiced-gpu.conf", target)
    return root


@pytest.mark.parametrize("drop_in", [False, True])
def test_verify_prints_nothing(tmp_path: Path, drop_in: bool) -> None:
    root = _root_with_unit(tmp_path / "root", drop_in)
    run = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                          "cosyvoiced.service"], capture_output=True, text=True, check=False)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_verify_would_catch_a_broken_drop_in(tmp_path: Path) -> None:
    root = _root_with_unit(tmp_path / "root", drop_in=True)
    (root / "etc/systemd/system/cosyvoiced.service.d/gpu.conf").write_text(
        "[Service]\nDeviceAlow=/dev/nvidiactl rw\n")
    run = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                          "cosyvoiced.service"], capture_output=True, text=True, check=False)
    assert "DeviceAlow" in run.stderr


def test_security_exposure_is_ok() -> None:
    run = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=25",
                          str(UNITS / "cosyvoiced.service")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-2000:]
    exposure = re.search(r"Overall exposure level for cosyvoiced.service: ([\d.]+)", run.stdout)
    assert exposure is not None
    assert float(exposure.group(1)) <= 2.5


def test_unit_contract() -> None:
    unit = (UNITS / "cosyvoiced.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                 "KillMode=mixed", "User=cosyvoiced", "StateDirectory=cosyvoiced",
                 "LogsDirectory=cosyvoiced", "RuntimeDirectory=cosyvoiced",
                 "CacheDirectory=cosyvoiced",
                 "ConfigurationDirectory=cosyvoiced", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes",
                 "ExecReload=/usr/bin/kill -HUP $MAINPID", "RestartPreventExitStatus=2"):
        assert line in unit, line
    # In PrivateUsers='s namespace every submitter's file is owned by nobody: the inbox's
    # owner check passed for any two of them (Bob's job cloned Alice's dropped voice).
    assert "PrivateUsers=yes" not in unit
    # The stop timeout covers the daemon's own drain: drain_timeout_s + 2 x kill_grace_s.
    stop = int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1))  # type: ignore[union-attr]
    assert stop >= 30 + 2 * 5


def test_file_limit_has_room_above_the_connection_caps() -> None:
    # Connections over a cap are refused with a 503; the file table must never run out
    # first (accept() would fail with EMFILE, and so would every file the daemon opens).
    unit = (UNITS / "cosyvoiced.service").read_text()
    found = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert found is not None, "the unit sets no LimitNOFILE="
    caps = HttpConfig().max_connections + MetricsConfig().max_connections + \
        WyomingConfig().max_connections + ZmqConfig().max_connections
    assert int(found.group(1)) >= 8 * caps


def test_results_and_failed_inputs_age_out_and_jobs_never(tmp_path: Path) -> None:
    """Submitters cannot delete from outbox/ and failed/, so tmpfiles ages them (30 days);
    inbox/ and work/ hold jobs not served yet, never aged. tmpfiles counts age from ctime
    too, which no test can set back: the entries' ages are read as written, and a copy with
    1 s for 30 days is cleaned for real by `systemd-tmpfiles --clean`."""
    conf = (UNITS / "cosyvoiced.tmpfiles.conf").read_text()
    entries = [line.split() for line in conf.splitlines() if line.startswith("d ")]
    ages = {Path(path).name: age for _type, path, _mode, _user, _group, age in entries}
    assert ages == {"cosyvoiced": "-", "spool": "-", "inbox": "-", "outbox": "30d",
                    "failed": "30d", "work": "-"}
    quick = tmp_path / "quick.conf"  # owned by whoever runs it: no users needed
    quick.write_text("".join(f"d {path} {mode} - - {'1s' if age == '30d' else age}\n"
                             for _type, path, mode, _user, _group, age in entries))
    root = tmp_path / "root"
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(quick)], check=True)
    spool = root / "var/lib/cosyvoiced/spool"
    for folder in ("inbox", "outbox", "failed", "work"):
        (spool / folder / "a-file.txt").write_text("kept or not")

    def cleaned() -> bool:
        subprocess.run(["systemd-tmpfiles", f"--root={root}", "--clean", str(quick)],
                       check=True)
        return not any((spool / folder / "a-file.txt").exists()
                       for folder in ("outbox", "failed"))

    wait_until(cleaned, 10, "outbox/ and failed/ to be cleaned")
    assert (spool / "inbox/a-file.txt").exists()
    assert (spool / "work/a-file.txt").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_sysusers_and_tmpfiles_build_the_spool(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}",
                    str(UNITS / "cosyvoiced.sysusers.conf")], check=True)
    passwd = {line.split(":")[0]: line.split(":") for line in
              (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in
              (root / "etc/group").read_text().splitlines()}
    uid = int(passwd["cosyvoiced"][2])
    submit = groups["cosyvoiced-submit"]
    assert "cosyvoiced" in submit[3].split(",")  # the daemon reads what submitters drop
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create",
                    str(UNITS / "cosyvoiced.tmpfiles.conf")], check=True)
    spool = root / "var/lib/cosyvoiced/spool"
    expected = {"inbox": (0o3770, "cosyvoiced-submit"), "outbox": (0o2750, "cosyvoiced-submit"),
                "failed": (0o2750, "cosyvoiced-submit"), "work": (0o700, "cosyvoiced")}
    for name, (mode, group) in expected.items():
        info = (spool / name).stat()
        assert stat.S_IMODE(info.st_mode) == mode, name
        assert info.st_uid == uid, name
        assert info.st_gid == int(groups[group][2]), name

"""The Debian package, built with `make deb` and installed into a throwaway bookworm chroot.

Nothing is installed on this machine itself: debootstrap makes a minimal root, apt installs
the package there (no systemd runs in it, so the maintainer scripts must not start the
service), and the installed `cosyvoiced` checks its config and serves one job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from tests.daemon import assert_speech, wait_until

REPO = Path(__file__).resolve().parent.parent
MIRROR = os.environ.get("COSYVOICED_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TEXT = "Installed from the Debian package, and speaking."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="a chroot needs root"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian host"),
]


def _run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), check=True, capture_output=True, text=True,
                          timeout=1800, env=env)


@pytest.fixture(scope="module")
def bootstrapping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Popen[bytes]]]:
    """debootstrap, started first and left running: it waits mostly on the mirror and the
    disk, so it overlaps the CPU-bound build (85 s of this file's time on 2 cores)."""
    if shutil.which("debootstrap") is None:
        _run("apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap",
             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    root = tmp_path_factory.mktemp("chroot") / "root"
    # python3, the package's largest dependency, comes in now rather than with the package.
    # The output goes to a file: a pipe nobody reads until the build ends could fill.
    with (root.parent / "debootstrap.log").open("w+") as log:
        process = subprocess.Popen(["debootstrap", "--variant=minbase", "--include=python3",
                                    "bookworm", str(root), MIRROR],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            yield root, process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture(scope="module")
def build(bootstrapping: tuple[Path, Popen[bytes]],
          tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """`make deb`'s script: dpkg-buildpackage, then lintian --fail-on error; packed with
    gzip -1 rather than xz -6, 140 s sooner (see packaging/debian/rules)."""
    return _run(str(REPO / "packaging/build-deb.sh"), str(tmp_path_factory.mktemp("deb")),
                env=dict(os.environ, COSYVOICED_DEB_COMPRESSION="-Zgzip -z1"))


@pytest.fixture(scope="module")
def deb(build: subprocess.CompletedProcess[str]) -> Path:
    return Path(build.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def chroot(bootstrapping: tuple[Path, Popen[bytes]]) -> Iterator[Path]:
    root, process = bootstrapping
    returncode = process.wait(timeout=1800)
    assert returncode == 0, (root.parent / "debootstrap.log").read_text()[-4000:]
    (root / "proc").mkdir(exist_ok=True)
    _run("mount", "-t", "proc", "proc", str(root / "proc"))
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def test_lintian_shows_no_errors(build: subprocess.CompletedProcess[str], deb: Path) -> None:
    assert deb.name == "cosyvoiced_0.1.0-1_amd64.deb"
    assert "lintian" in (REPO / "packaging/build-deb.sh").read_text()
    tags = [line for line in build.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert not [tag for tag in tags if tag.startswith("E:")], tags


def test_package_installs_into_a_chroot_and_serves_a_job(deb: Path, chroot: Path) -> None:
    shutil.copy(deb, chroot / "tmp" / deb.name)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run("chroot", str(chroot), "apt-get", "install", "-y", "-q", "--no-install-recommends",
         f"/tmp/{deb.name}", env=env)
    assert not (chroot / "run/systemd/system").exists()  # no systemd: nothing was started
    conffiles = _run("chroot", str(chroot), "dpkg-query", "-W", "-f=${Conffiles}", "cosyvoiced")
    assert "/etc/cosyvoiced/cosyvoiced.toml" in conffiles.stdout
    assert (chroot / "usr/bin/cosyvoicectl").exists()
    unit = [p for p in (chroot / "lib/systemd/system/cosyvoiced.service",
                        chroot / "usr/lib/systemd/system/cosyvoiced.service") if p.exists()]
    assert unit
    passwd = (chroot / "etc/passwd").read_text()
    assert passwd.count("\ncosyvoiced:") == 1
    spool = chroot / "var/lib/cosyvoiced/spool/inbox"
    assert spool.is_dir()

    check = _run("chroot", str(chroot), "/usr/bin/cosyvoiced", "--check-config", "--config",
                 "/etc/cosyvoiced/cosyvoiced.toml")
    assert check.stdout.strip().endswith(": OK")

    (chroot / "tmp/one-job.toml").write_text(
        '[spool]\ndir = "/tmp/spool"\n[log]\nfile = ""\n[zmq]\nbind = []\n')
    daemon = subprocess.Popen(["chroot", str(chroot), "/usr/bin/cosyvoiced", "--config",
                               "/tmp/one-job.toml"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        inbox = chroot / "tmp/spool/inbox"
        wait_until(inbox.is_dir, 60, "the spool")
        (inbox / ".job.tmp").write_text(TEXT)
        os.rename(inbox / ".job.tmp", inbox / "job.txt")
        record_path = chroot / "tmp/spool/outbox/job.json"
        wait_until(record_path.exists, 120, "the installed daemon's result")
        record = json.loads(record_path.read_text())
        assert_speech(chroot / "tmp/spool/outbox" / record["file"], 22050, TEXT)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    assert daemon.returncode == 0, daemon.stdout.read().decode() if daemon.stdout else ""
    if daemon.stdout is not None:
        daemon.stdout.close()
    _purge_takes_what_the_daemon_made(chroot, env)


def _purge_takes_what_the_daemon_made(chroot: Path, env: dict[str, str]) -> None:
    """There was no postrm: a purge left the spool (results, voices, the admin token), the
    logs and the cache behind."""
    made = [chroot / "var/lib/cosyvoiced", chroot / "var/log/cosyvoiced",
            chroot / "var/cache/cosyvoiced"]
    for directory in made[1:]:  # the unit's LogsDirectory= and CacheDirectory=
        directory.mkdir(exist_ok=True)
    _run("chroot", str(chroot), "apt-get", "remove", "-y", "-q", "cosyvoiced", env=env)
    assert all(directory.is_dir() for directory in made)
    _run("chroot", str(chroot), "apt-get", "purge", "-y", "-q", "cosyvoiced", env=env)
    assert not [directory for directory in made if directory.exists()]


def test_an_upgrade_stops_the_service_before_unpacking(deb: Path, tmp_path: Path) -> None:
    """--restart-after-upgrade left the old daemon running while dpkg replaced its
    virtualenv: a worker or encoder it spawned meanwhile ran half-replaced code."""
    _run("dpkg-deb", "-e", str(deb), str(tmp_path / "control"))
    preinst = (tmp_path / "control" / "preinst").read_text()  # the new package's, first
    stop = "deb-systemd-invoke stop 'cosyvoiced.service'"
    assert stop in preinst, preinst
    assert '"$1" = upgrade' in preinst[:preinst.index(stop)].rsplit("if ", 1)[-1], preinst

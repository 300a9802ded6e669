"""`make install DESTDIR=... PREFIX=...`: a staged tree whose paths are the final ones."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_install_stages_a_working_tree(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={stage}", "PREFIX=/usr/local",
                    f"PYTHON={sys.executable}"], check=True, capture_output=True, timeout=900)
    venv = stage / "usr/local/lib/cosyvoiced/venv"
    script = (venv / "bin/cosyvoiced").read_text().splitlines()[0]
    assert script == "#!/usr/local/lib/cosyvoiced/venv/bin/python"  # the final path
    assert (stage / "usr/local/bin/cosyvoicectl").readlink() == Path(
        "/usr/local/lib/cosyvoiced/venv/bin/cosyvoicectl")
    unit = (stage / "lib/systemd/system/cosyvoiced.service").read_text()
    assert "ExecStart=/usr/local/bin/cosyvoiced --config /etc/cosyvoiced/cosyvoiced.toml" in unit
    for entry in ("usr/local/lib/sysusers.d/cosyvoiced.conf",
                  "usr/local/lib/tmpfiles.d/cosyvoiced.conf", "etc/cosyvoiced/cosyvoiced.toml"):
        assert (stage / entry).is_file(), entry
    check = subprocess.run([str(venv / "bin/python"), "-m", "cosyvoiced", "--check-config",
                            "--config", str(stage / "etc/cosyvoiced/cosyvoiced.toml")],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_make_dist_builds_an_sdist_and_a_wheel_without_the_test_doubles(tmp_path: Path) -> None:
    subprocess.run(["make", "-C", str(REPO), "dist"], check=True, capture_output=True,
                   timeout=600)
    dist = REPO / "dist"
    wheel = dist / "cosyvoiced-0.1.0-py3-none-any.whl"
    assert (dist / "cosyvoiced-0.1.0.tar.gz").is_file()
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "cosyvoiced/supervisor.py" in names
    assert not [name for name in names if name.startswith("tests/")]

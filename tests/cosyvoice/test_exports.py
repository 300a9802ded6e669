"""load_trt and load_vllm with the real upstream code: the model loads from the overlay in the
export directory, leaving the model directory untouched; where the switches cannot work (this
lane has no CUDA, TensorRT or vLLM) both `--check-config` and the worker refuse them by name,
where upstream would turn them off silently; and without them the check passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cosyvoiced.config import CosyVoiceConfig
from cosyvoiced.engines import exports
from tests.cosyvoice.conftest import DEVICE, REPO, cosyvoice_daemon
from tests.daemon import REPO as PROJECT
from tests.daemon import write_config

EXIT_ENGINE = 3
CHECK_TIMEOUT_S = 300.0  # importing torch and upstream from a cold disk
MODEL_CLASSES = {1: "CosyVoice", 2: "CosyVoice2", 3: "CosyVoice3"}
YAML = {1: "cosyvoice.yaml", 2: "cosyvoice2.yaml", 3: "cosyvoice3.yaml"}
PLAN = "flow.decoder.estimator.fp32.mygpu.plan"


def _snapshot(directory: Path) -> list[tuple[str, int, int]]:
    return sorted((str(path.relative_to(directory)), path.lstat().st_size,
                   path.lstat().st_mtime_ns) for path in directory.rglob("*"))


def _read_only(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)


def _writable(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)


def test_the_model_loads_from_its_overlay_and_exports_land_in_the_cache(
        tmp_path: Path, model_dir: Path, model_version: int) -> None:
    from cosyvoiced.engines import cosyvoice, upstream  # noqa: PLC0415 - torch: lane only

    model_class = getattr(upstream.import_upstream(REPO), MODEL_CLASSES[model_version])
    settings = CosyVoiceConfig(model_dir=str(model_dir), repo=REPO, load_trt=True,
                               export_dir=str(tmp_path / "exports"))
    before = _snapshot(model_dir)
    _read_only(model_dir)
    try:
        with cosyvoice._random_state_kept(), warnings.catch_warnings(), \
                exports.load_dir(settings, {"torch": "lane", "gpu": None}) as load_from:
            warnings.simplefilter("ignore")  # upstream's dependencies' deprecations, not ours
            # Switches off (upstream of 2024 defaults to load_jit); on CPU upstream would build
            # no plan anyway: the test writes one where upstream would.
            loaded = model_class(load_from, **cosyvoice._load_options(model_class,
                                                                      CosyVoiceConfig()))
            plan = Path(f"{loaded.model_dir}/{PLAN}")  # as upstream names it
            plan.write_bytes(b"plan")
    finally:
        _writable(model_dir)
    assert loaded.model.llm is not None
    assert loaded.frontend is not None
    assert plan.parent == Path(load_from)
    assert plan.parent.is_relative_to(tmp_path / "exports")
    assert plan.parent.name == model_dir.name
    assert (plan.parent / f"{PLAN}.done").exists()
    assert _snapshot(model_dir) == before


def _check_config(root: Path, model_version: int, **switches: bool
                  ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    model = root / f"model-v{model_version}"
    model.mkdir()
    (model / YAML[model_version]).touch()  # the probe only imports: the yaml is enough
    path = root / "cosyvoiced.toml"
    devices = {"devices": [DEVICE]} if DEVICE else {}
    write_config(path, {"engine": {"name": "cosyvoice"},
                        "engine.cosyvoice": {"model_dir": str(model), "repo": REPO,
                                             **switches},
                        "worker": devices})
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--check-config", "--config",
                          str(path)], env=dict(os.environ, PYTHONPATH=str(PROJECT)),
                         cwd=PROJECT, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                         check=False)
    return path, run


@pytest.mark.parametrize("switch", ["load_trt", "load_vllm"])
def test_check_config_refuses_a_switch_this_machine_cannot_serve(
        tmp_path: Path, model_version: int, switch: str) -> None:
    path, run = _check_config(tmp_path, model_version, **{switch: True})
    assert run.returncode == EXIT_ENGINE, run.stderr
    prefix = f"cosyvoiced: {path}: the cosyvoice engine cannot load: engine.cosyvoice.{switch}: "
    lines = run.stderr.strip().splitlines()
    assert all(line.startswith(prefix) for line in lines), run.stderr
    assert any(line.startswith(prefix + "needs ") for line in lines), run.stderr


def test_check_config_passes_without_them(tmp_path: Path, model_version: int) -> None:
    path, run = _check_config(tmp_path, model_version, load_trt=False, load_vllm=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"cosyvoiced: {path}: OK"


def test_the_worker_refuses_load_trt_instead_of_ignoring_it(
        tmp_path: Path, model_dir: Path) -> None:
    daemon = cosyvoice_daemon(tmp_path / "d", model_dir, worker={"max_start_failures": 1},
                              load_trt=True)
    try:
        daemon.start(wait_ready=False)
        assert daemon.wait_exit(timeout_s=120) == EXIT_ENGINE
        (failure,) = daemon.log_events("engine_load_failed")
        assert "engine.cosyvoice.load_trt: needs " in failure["exception"], failure
    finally:
        daemon.stop()

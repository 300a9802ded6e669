"""load_trt and load_vllm: their exports go to engine.cosyvoice.export_dir (the unit's
CacheDirectory=), through an overlay of links to the read-only model directory; and
`cosyvoiced --check-config` refuses them where this machine cannot serve them.

This machine has no NVIDIA GPU, no TensorRT and no vLLM: the check-config runs here are the
refusals. That the switches pass where nothing is missing is tested in the CosyVoice lane
(tests/cosyvoice/test_exports.py), whose install the import probe accepts.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cosyvoiced import cpuflags
from cosyvoiced.config import CosyVoiceConfig
from cosyvoiced.engines import exports
from tests.daemon import REPO, write_config

EXIT_ENGINE = 3  # what the service exits with when its engine cannot load
CHECK_TIMEOUT_S = 60.0
RUNTIME: dict[str, str | None] = {"torch": "2.11.0", "gpu": "NVIDIA H200", "tensorrt": "10.3"}
PLAN = "flow.decoder.estimator.fp32.mygpu.plan"


# -- where the exports go (pure) --------------------------------------------------------
def test_the_overlay_is_in_the_export_dir_under_the_model_directorys_name() -> None:
    overlay = exports.overlay_dir("/var/cache/cosyvoiced/exports",
                                  "/opt/models/CosyVoice2-0.5B", "ab" * 32)
    assert overlay == Path("/var/cache/cosyvoiced/exports/CosyVoice2-0.5B-abababababababab"
                           "/CosyVoice2-0.5B")


def test_the_overlay_key_follows_the_model_files_and_the_runtime() -> None:
    entries = [("llm.pt", 100, 1), ("cosyvoice2.yaml", 5, 1)]
    key = exports.overlay_key("/m/CosyVoice2-0.5B", entries, RUNTIME)
    assert key == exports.overlay_key("/m/CosyVoice2-0.5B", list(reversed(entries)), RUNTIME)
    assert key != exports.overlay_key("/m/CosyVoice2-0.5B",
                                      [("llm.pt", 100, 2), ("cosyvoice2.yaml", 5, 1)], RUNTIME)
    assert key != exports.overlay_key("/other/CosyVoice2-0.5B", entries, RUNTIME)
    assert key != exports.overlay_key("/m/CosyVoice2-0.5B", entries,
                                      {**RUNTIME, "gpu": "NVIDIA L20"})


def test_export_names_are_upstreams() -> None:
    assert exports.export_names(CosyVoiceConfig()) == []
    assert exports.export_names(CosyVoiceConfig(load_trt=True)) == [PLAN]
    assert exports.export_names(CosyVoiceConfig(load_trt=True, load_vllm=True, fp16=True)) == [
        "vllm", "flow.decoder.estimator.fp16.mygpu.plan"]


def test_only_unfinished_exports_written_in_the_overlay_are_stale() -> None:
    names = ["vllm", PLAN]
    assert exports.stale_exports(names, written={"vllm", PLAN}, done={PLAN}) == ["vllm"]
    assert exports.stale_exports(names, written=set(), done=set()) == []  # linked or absent


# -- what the machine needs (pure) ------------------------------------------------------
@pytest.mark.parametrize(("devices", "gpus", "problem"), [
    (["cpu"], 1, 'worker.devices = ["cpu"] puts workers on the CPU'),
    (["cuda:0", "cpu"], 1, 'worker.devices = ["cuda:0", "cpu"] puts workers on the CPU'),
    (["cuda:0"], 0, "this machine has no NVIDIA GPU"),
    (["cuda:0", "cuda:1"], 1, "names cuda:1 but this machine has 1 NVIDIA GPU(s)"),
    (["cuda:0", "cuda:1"], 2, None),
])
def test_devices_problem(devices: list[str], gpus: int, problem: str | None) -> None:
    found = exports.devices_problem(devices, gpus)
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_unmet_needs_name_the_key_and_what_is_missing() -> None:
    both = CosyVoiceConfig(load_trt=True, load_vllm=True)
    assert exports.unmet_needs(both, 2, None, lambda _: True, upstream_has_vllm=True) == []
    assert exports.unmet_needs(CosyVoiceConfig(), 2, "no CUDA", lambda _: False, False) == []
    problems = exports.unmet_needs(both, 1, "no CUDA", lambda module: module == "vllm", True)
    assert problems == [
        "engine.cosyvoice.load_trt: no CUDA",
        "engine.cosyvoice.load_trt: needs TensorRT (pip install tensorrt); no 'tensorrt' "
        "module in this Python environment",
        "engine.cosyvoice.load_vllm: no CUDA",
        "engine.cosyvoice.load_vllm: CosyVoice-300M (v1) has no vLLM path; only CosyVoice2 "
        "and CosyVoice3 models do"]
    (old_upstream,) = exports.unmet_needs(CosyVoiceConfig(load_vllm=True), 2, None,
                                          lambda _: True, upstream_has_vllm=False)
    assert "has no cosyvoice.vllm.cosyvoice2 module" in old_upstream


# -- the overlay on disk ----------------------------------------------------------------
def _read_only_model(root: Path) -> Path:
    model = root / "models" / "CosyVoice2-0.5B"
    (model / "CosyVoice-BlankEN").mkdir(parents=True)
    (model / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    (model / "llm.pt").write_bytes(b"weights")
    (model / "CosyVoice-BlankEN" / "config.json").write_text("{}")
    for path in (model / "CosyVoice-BlankEN", model):
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return model


def _snapshot(directory: Path) -> list[tuple[str, int, int]]:
    return sorted((str(path.relative_to(directory)), path.lstat().st_size,
                   path.lstat().st_mtime_ns) for path in directory.rglob("*"))


def test_exports_are_written_in_the_overlay_and_the_model_reads_through_it(
        tmp_path: Path) -> None:
    model = _read_only_model(tmp_path)
    before = _snapshot(model)
    settings = CosyVoiceConfig(model_dir=str(model), load_trt=True, load_vllm=True,
                               export_dir=str(tmp_path / "cache" / "exports"))
    with exports.load_dir(settings, RUNTIME) as load_from:
        overlay = Path(load_from)
        assert overlay.name == model.name
        assert overlay.is_relative_to(tmp_path / "cache" / "exports")
        # What upstream does with the directory it is given: read the model, write exports.
        assert (overlay / "cosyvoice2.yaml").read_text() == "sample_rate: 24000\n"
        assert (overlay / "CosyVoice-BlankEN" / "config.json").read_text() == "{}"
        (overlay / PLAN).write_bytes(b"plan")
        (overlay / "vllm").mkdir()
        (overlay / "vllm" / "config.json").write_text("{}")
    assert _snapshot(model) == before
    assert (overlay / f"{PLAN}.done").exists()
    assert (overlay / "vllm.done").exists()
    with exports.load_dir(settings, RUNTIME) as again:  # the next start reuses them
        assert Path(again) == overlay
        assert (overlay / PLAN).read_bytes() == b"plan"


def test_an_export_left_unfinished_is_made_again(tmp_path: Path) -> None:
    model = _read_only_model(tmp_path)
    settings = CosyVoiceConfig(model_dir=str(model), load_vllm=True,
                               export_dir=str(tmp_path / "exports"))
    def die_exporting() -> None:
        with exports.load_dir(settings, RUNTIME) as load_from:
            (Path(load_from) / "vllm").mkdir()  # the worker dies half-way through the export
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        die_exporting()
    overlays = list((tmp_path / "exports").glob("*/CosyVoice2-0.5B"))
    assert [(overlay / "vllm").is_dir() for overlay in overlays] == [True]
    with exports.load_dir(settings, RUNTIME) as again:
        assert not (Path(again) / "vllm").exists()  # upstream would have loaded it as it was


def test_exports_the_model_directory_ships_are_used_in_place(tmp_path: Path) -> None:
    model = _read_only_model(tmp_path)
    model.chmod(stat.S_IRWXU)
    (model / PLAN).write_bytes(b"prebuilt")
    (model / "flow.decoder.estimator.fp16.mygpu.plan").touch()  # empty: upstream rebuilds it
    model.chmod(stat.S_IRUSR | stat.S_IXUSR)
    settings = CosyVoiceConfig(model_dir=str(model), load_trt=True,
                               export_dir=str(tmp_path / "exports"))
    with exports.load_dir(settings, RUNTIME) as load_from:
        assert (Path(load_from) / PLAN).read_bytes() == b"prebuilt"
        assert not (Path(load_from) / "flow.decoder.estimator.fp16.mygpu.plan").exists()
    assert not (Path(load_from) / f"{PLAN}.done").exists()  # not ours to vouch for


def test_without_exports_upstream_gets_the_model_directory(tmp_path: Path) -> None:
    model = _read_only_model(tmp_path)
    settings = CosyVoiceConfig(model_dir=str(model), export_dir=str(tmp_path / "exports"))
    with exports.load_dir(settings, RUNTIME) as load_from:
        assert load_from == str(model)
    assert not (tmp_path / "exports").exists()


# -- cosyvoiced --check-config ----------------------------------------------------------
def _check_config(tmp_path: Path, **cosyvoice: Any
                  ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    model = tmp_path / "CosyVoice2-0.5B"
    model.mkdir(exist_ok=True)
    (model / "cosyvoice2.yaml").touch()
    devices = cosyvoice.pop("devices", ["cpu"])
    path = tmp_path / "cosyvoiced.toml"
    write_config(path, {"engine": {"name": "cosyvoice"},
                        "engine.cosyvoice": {"model_dir": str(model), **cosyvoice},
                        "worker": {"devices": devices}})
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--check-config", "--config",
                          str(path)], env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                         capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False)
    return path, run


def _refusals(path: Path, run: subprocess.CompletedProcess[str]) -> list[str]:
    prefix = f"cosyvoiced: {path}: the cosyvoice engine cannot load: "
    lines = run.stderr.strip().splitlines()
    assert all(line.startswith(prefix) for line in lines), run.stderr
    return [line.removeprefix(prefix) for line in lines]


def test_check_config_refuses_load_trt_without_cuda_or_tensorrt(tmp_path: Path) -> None:
    path, run = _check_config(tmp_path, load_trt=True)
    assert run.returncode == EXIT_ENGINE, run.stderr
    assert run.stdout == ""
    assert _refusals(path, run) == [
        'engine.cosyvoice.load_trt: needs CUDA on every worker, and worker.devices = ["cpu"] '
        'puts workers on the CPU; list GPUs only, such as ["cuda:0"]',
        "engine.cosyvoice.load_trt: needs TensorRT (pip install tensorrt); no 'tensorrt' "
        "module in this Python environment"]


def test_check_config_refuses_load_vllm_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    path, run = _check_config(tmp_path, load_vllm=True, devices=["cuda:0"])
    assert run.returncode == EXIT_ENGINE, run.stderr
    assert _refusals(path, run) == [
        "engine.cosyvoice.load_vllm: needs CUDA, and this machine has no NVIDIA GPU (none "
        'found by NVML or in /proc/driver/nvidia/gpus) for worker.devices = ["cuda:0"]',
        "engine.cosyvoice.load_vllm: needs vLLM (pip install vllm); no 'vllm' module in this "
        "Python environment",
        # The installed upstream package (v1 era), when there is one, has no vLLM model.
        "engine.cosyvoice.load_vllm: the upstream code in use has no cosyvoice.vllm.cosyvoice2 "
        "module; point engine.cosyvoice.repo at a CosyVoice checkout that has it"]


def test_check_config_without_them_goes_on_to_the_import_probe(tmp_path: Path) -> None:
    _, run = _check_config(tmp_path, load_trt=False, load_vllm=False)
    assert "engine.cosyvoice.load_" not in run.stderr
    if run.returncode != 0:  # this venv may lack torch: the probe's own finding, not ours
        assert "ModuleNotFoundError" in run.stderr, run.stderr


def test_check_config_refuses_cpu_bf16_where_the_cpu_would_emulate_it(tmp_path: Path) -> None:
    """engine.cosyvoice.cpu_bf16 on CPU workers: refused exactly where this machine's CPU
    lacks AMX-BF16 and AVX512-BF16; on GPU workers only, it is not the CPU's business."""
    path, run = _check_config(tmp_path, cpu_bf16=True)
    expected = cpuflags.bf16_problem()
    if expected is None:
        assert "cpu_bf16" not in run.stderr
    else:
        assert run.returncode == EXIT_ENGINE, run.stderr
        assert _refusals(path, run) == [expected]
    _, run = _check_config(tmp_path, cpu_bf16=True, devices=["cuda:0"])
    assert "cpu_bf16" not in run.stderr

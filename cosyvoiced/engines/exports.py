"""Upstream's load-time exports, `load_trt` (TensorRT plans of the flow estimator) and
`load_vllm` (the LLM saved for vLLM): where they are written, and what the machine needs.

Upstream writes both into the model directory: it builds their paths inside the model class's
`__init__` from the directory it is given, with no parameter to send them elsewhere. Under the
hardened unit the model directory is read-only (ProtectSystem=strict), so the engine hands
upstream an *overlay* instead: a directory under `engine.cosyvoice.export_dir` (in the unit's
CacheDirectory=) that holds a symlink to every entry of the model directory and carries the
model directory's own name (v1 of 2024 reads `-Instruct` from it). Upstream reads the model
through the links and writes its exports beside them, in the cache. Copying the model instead
would duplicate GiBs; patching upstream's paths would mean carrying its code.

- An overlay is named after a digest of the model's files (name, size, mtime) and of the
  runtime the exports are built with (GPU, torch, TensorRT, vLLM): a plan runs only on the GPU
  model and TensorRT version it was built for, and a changed model needs new exports.
- Exports the model directory already holds (an operator's prebuilt plan) are linked, so
  upstream uses them as it would in place.
- Upstream only checks that an export exists, so one half-written by a worker that died would
  be loaded as it is: an export gets a `.done` marker once a load with it has succeeded, and one
  found without its marker is deleted before the next load. Workers that share an overlay load
  one at a time (a lock file), so none reads what another is still writing.

The checks at the end decide whether a config can use these switches on this machine; they
import neither torch nor vLLM, so the supervisor's --check-config can run them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from cosyvoiced import logs, memory
from cosyvoiced.config import CosyVoiceConfig

EXPORT_OPTIONS = ("load_trt", "load_vllm")
# The Python modules each switch needs, and what to install for them.
NEEDED_MODULES = {"load_trt": ("tensorrt", "TensorRT (pip install tensorrt)"),
                  "load_vllm": ("vllm", "vLLM (pip install vllm)")}
# Upstream's model class for vLLM, registered with vLLM before the model loads.
VLLM_MODEL_MODULE = "cosyvoice.vllm.cosyvoice2"
VLLM_MODEL_CLASS = "CosyVoice2ForCausalLM"
MODEL_FILES = {"cosyvoice.yaml": 1, "cosyvoice2.yaml": 2, "cosyvoice3.yaml": 3}
DONE_SUFFIX = ".done"
KEY_CHARS = 16
NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"

log = logs.get_logger("cosyvoiced.engines.exports")


def export_names(settings: CosyVoiceConfig) -> list[str]:
    """What upstream writes into the directory it loads from, as its own code names it."""
    names = []
    if settings.load_vllm:
        names.append("vllm")
    if settings.load_trt:
        precision = "fp16" if settings.fp16 else "fp32"
        names.append(f"flow.decoder.estimator.{precision}.mygpu.plan")
    return names


def overlay_key(model_dir: str, entries: list[tuple[str, int, int]],
                runtime: dict[str, str | None]) -> str:
    """The digest an overlay is named by: the model (its path and its entries' name, size
    and mtime) and the runtime the exports are built with."""
    identity = {"model": model_dir, "entries": sorted(entries), "runtime": runtime}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def overlay_dir(export_dir: str, model_dir: str, key: str) -> Path:
    """Where the overlay of `model_dir` lives: <export_dir>/<model name>-<key>/<model name>
    (the last part keeps the model directory's name, which upstream may read)."""
    name = Path(model_dir).name
    return Path(export_dir) / f"{name}-{key[:KEY_CHARS]}" / name


def stale_exports(names: list[str], written: set[str], done: set[str]) -> list[str]:
    """The exports to delete before loading: written into the overlay (not linked from the
    model directory) but never marked done, so possibly half-written."""
    return [name for name in names if name in written and name not in done]


def _entries(model_dir: Path) -> list[tuple[str, int, int]]:
    found = []
    with os.scandir(model_dir) as scan:
        for entry in scan:
            info = entry.stat()
            found.append((entry.name, info.st_size, info.st_mtime_ns))
    return found


def _build_overlay(model_dir: Path, overlay: Path) -> None:
    """Links to every entry of `model_dir`, made under a temporary name and renamed, so a
    worker that dies half-way leaves no overlay with links missing."""
    building = overlay.with_name(f".{overlay.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    for entry in model_dir.iterdir():
        # Upstream rebuilds an empty plan where it lies: it must not lie in the model dir.
        if entry.suffix == ".plan" and entry.is_file() and entry.stat().st_size == 0:
            continue
        (building / entry.name).symlink_to(entry.resolve())
    building.rename(overlay)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def load_dir(settings: CosyVoiceConfig, runtime: dict[str, str | None]) -> Iterator[str]:
    """The directory to give upstream's model class, for the time it loads: the model
    directory itself without exports; with them, its overlay (made if need be), locked
    against the other workers, its half-written exports removed, and the exports upstream
    wrote marked done once the load has succeeded."""
    names = export_names(settings)
    if not names:
        yield settings.model_dir
        return
    model_dir = Path(settings.model_dir).resolve()
    key = overlay_key(str(model_dir), _entries(model_dir), runtime)
    overlay = overlay_dir(settings.export_dir, str(model_dir), key)
    overlay.parent.mkdir(parents=True, exist_ok=True)
    with _locked(overlay.parent / ".lock"):
        if not overlay.is_dir():
            _build_overlay(model_dir, overlay)
        written = {name for name in names
                   if (overlay / name).exists() and not (overlay / name).is_symlink()}
        done = {name for name in names if (overlay / (name + DONE_SUFFIX)).exists()}
        for name in stale_exports(names, written, done):
            log.warning("cosyvoice_export_removed", export=str(overlay / name),
                        message="left unfinished by an earlier load; made again")
            _remove(overlay / name)
        log.info("cosyvoice_exports", overlay=str(overlay), exports=names)
        yield str(overlay)
        for name in names:
            if (overlay / name).exists() and not (overlay / name).is_symlink():
                (overlay / (name + DONE_SUFFIX)).touch()


@contextlib.contextmanager
def worker_load_dir(settings: CosyVoiceConfig, version: int) -> Iterator[str]:
    """`load_dir` in the worker: the switches refused where they cannot work (upstream
    would turn them off silently without CUDA), and upstream's vLLM model registered."""
    if not export_names(settings):
        yield settings.model_dir
        return
    import torch  # noqa: PLC0415 - the worker's engine has it imported already

    problems = worker_problems(settings, version, torch.cuda.is_available())
    if problems:
        raise RuntimeError("; ".join(problems))
    if settings.load_vllm:
        register_vllm_model()
    with load_dir(settings, runtime_identity(settings)) as directory:
        yield directory


def register_vllm_model() -> None:
    """Tell vLLM about upstream's CosyVoice2 LLM class, as upstream's vllm_example.py does
    before it loads a model with load_vllm (the export names it in its config.json)."""
    registry = importlib.import_module("vllm").ModelRegistry  # optional: load_vllm only
    model_class = getattr(importlib.import_module(VLLM_MODEL_MODULE), VLLM_MODEL_CLASS)
    registry.register_model(VLLM_MODEL_CLASS, model_class)


def runtime_identity(settings: CosyVoiceConfig) -> dict[str, str | None]:
    """What the exports are built with, for the overlay's key; in the worker (imports
    torch, and TensorRT/vLLM when their switch is on, as loading will anyway)."""
    import torch  # noqa: PLC0415 - the worker's engine has it imported already

    runtime: dict[str, str | None] = {"torch": torch.__version__, "gpu": None}
    if torch.cuda.is_available():
        runtime["gpu"] = torch.cuda.get_device_name()
    for option in EXPORT_OPTIONS:
        if getattr(settings, option):
            module = NEEDED_MODULES[option][0]
            runtime[module] = getattr(importlib.import_module(module), "__version__", None)
    return runtime


# -- what the machine needs -------------------------------------------------------------
def model_version(model_dir: str) -> int | None:
    """1, 2 or 3 by the model's yaml; None if it has none."""
    for file_name, version in MODEL_FILES.items():
        if (Path(model_dir) / file_name).is_file():
            return version
    return None


def devices_problem(devices: list[str], gpu_count: int) -> str | None:
    """Why workers on `devices` cannot run CUDA on a machine with `gpu_count` NVIDIA GPUs;
    None if they can."""
    listed = f"worker.devices = {json.dumps(devices)}"
    if "cpu" in devices:
        return (f"needs CUDA on every worker, and {listed} puts workers on the CPU; list "
                "GPUs only, such as [\"cuda:0\"]")
    if gpu_count == 0:
        return (f"needs CUDA, and this machine has no NVIDIA GPU (none found by NVML or in "
                f"{NVIDIA_PROC_GPUS}) for {listed}")
    missing = [device for device in devices if int(device.partition(":")[2]) >= gpu_count]
    if missing:
        return (f"needs CUDA, and {listed} names {missing[0]} but this machine has "
                f"{gpu_count} NVIDIA GPU(s)")
    return None


def unmet_needs(settings: CosyVoiceConfig, version: int | None, cuda_problem: str | None,
                installed: Callable[[str], bool], upstream_has_vllm: bool) -> list[str]:
    """One line per switch that cannot work here, naming the key and what is missing."""
    problems = []
    for option in EXPORT_OPTIONS:
        if not getattr(settings, option):
            continue
        key = f"engine.cosyvoice.{option}"
        if cuda_problem:
            problems.append(f"{key}: {cuda_problem}")
        module, what = NEEDED_MODULES[option]
        if not installed(module):
            problems.append(f"{key}: needs {what}; no {module!r} module in this Python "
                            "environment")
        if option == "load_vllm" and version == 1:
            problems.append(f"{key}: CosyVoice-300M (v1) has no vLLM path; only CosyVoice2 "
                            "and CosyVoice3 models do")
        elif option == "load_vllm" and not upstream_has_vllm:
            problems.append(f"{key}: the upstream code in use has no {VLLM_MODEL_MODULE} "
                            "module; point engine.cosyvoice.repo at a CosyVoice checkout "
                            "that has it")
    return problems


def installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def upstream_has_vllm(repo: str) -> bool:
    """Whether the upstream code (`repo`, else the installed `cosyvoice` package) has its
    vLLM model module; found by path, without importing upstream."""
    relative = Path(*VLLM_MODEL_MODULE.split(".")).with_suffix(".py")
    if repo:
        return (Path(repo) / relative).is_file()
    spec = importlib.util.find_spec("cosyvoice") if installed("cosyvoice") else None
    roots = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(root).parent / relative).is_file() for root in roots)


def gpu_count() -> int:
    """NVIDIA GPUs on this machine: NVML's count, else the driver's /proc entries (NVML's
    Python binding is the optional `gpu` extra)."""
    count = memory.nvml_device_count()
    if count:
        return count
    with contextlib.suppress(OSError):
        return len(os.listdir(NVIDIA_PROC_GPUS))
    return 0


def machine_problems(settings: CosyVoiceConfig, devices: list[str]) -> list[str]:
    """--check-config: the export switches this machine cannot serve with `devices`."""
    if not any(getattr(settings, option) for option in EXPORT_OPTIONS):
        return []
    return unmet_needs(settings, model_version(settings.model_dir),
                       devices_problem(devices, gpu_count()), installed,
                       upstream_has_vllm(settings.repo))


def worker_problems(settings: CosyVoiceConfig, version: int, cuda: bool) -> list[str]:
    """The same, in a worker about to load: `cuda` is whether it sees a CUDA device (upstream
    would turn the switches off silently without one)."""
    cuda_problem = None if cuda else "needs CUDA, and this worker sees no CUDA device"
    return unmet_needs(settings, version, cuda_problem, installed,
                       upstream_has_vllm(settings.repo))

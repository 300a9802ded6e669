"""Memory figures of the worker process: RSS from the OS, GPU from NVML and torch.

The GPU probes import nothing at module level: the supervisor uses `rss_bytes` only and must
never pull in torch or CUDA state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_T = TypeVar("_T")
_nvml: Any = None  # the pynvml module once initialised; False when there is no NVML


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    gpu_bytes: int | None = None  # NVML: this process's usage on every device
    torch_reserved_bytes: int | None = None  # torch's caching allocator, when torch is loaded

    @property
    def gpu_peak_bytes(self) -> int | None:
        """The larger GPU figure (NVML sees the CUDA context that torch does not count)."""
        figures = [f for f in (self.gpu_bytes, self.torch_reserved_bytes) if f is not None]
        return max(figures) if figures else None

    def to_dict(self) -> dict[str, int | None]:
        return {"rss_bytes": self.rss_bytes, "gpu_bytes": self.gpu_bytes,
                "torch_reserved_bytes": self.torch_reserved_bytes}


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of `pid` (default: this process); 0 if it is gone."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def _nvml_module() -> Any:
    global _nvml  # noqa: PLW0603 - initialise NVML once per process
    if _nvml is None:
        try:
            import pynvml  # noqa: PLC0415 - optional (nvidia-ml-py), GPU hosts only

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # noqa: BLE001 - no library, no driver or no GPU: no NVML figure
            _nvml = False
    return _nvml


def nvml_device_count() -> int:
    """NVIDIA GPUs on this host, per NVML (0 without NVML or a GPU)."""
    nvml = _nvml_module()
    if not nvml:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return 0


def nvml_process_bytes(pid: int) -> int | None:
    """GPU memory `pid` uses on all devices, per NVML; None without NVML or a GPU."""
    nvml = _nvml_module()
    if not nvml:
        return None
    used = 0
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            device = nvml.nvmlDeviceGetHandleByIndex(index)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(device):
                if process.pid == pid and process.usedGpuMemory:
                    used += int(process.usedGpuMemory)
    except nvml.NVMLError:
        return None
    return used


def _imported(name: str) -> Any:
    """The module `name` once its import has completed; None while absent or half-imported.

    The heartbeat thread runs while the engine imports torch (seconds on a GPU host): the
    module is in sys.modules from the start of its import, without most of its attributes.
    """
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    if module is None or getattr(spec, "_initializing", False):
        return None
    return module


def torch_reserved_bytes() -> int | None:
    torch = _imported("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_reserved())


ProbeFailed = Callable[[str, Exception], None]


def _probe(name: str, probe: Callable[[], _T], on_failure: ProbeFailed) -> _T | None:
    try:
        return probe()
    except Exception as error:  # noqa: BLE001 - a figure missing never ends the heartbeat
        on_failure(name, error)
        return None


def measure(on_failure: ProbeFailed | None = None) -> Memory:
    """This process's figures (called in the worker); a probe that fails gives no figure
    and is reported to `on_failure`."""
    report = on_failure or (lambda _name, _error: None)
    pid = os.getpid()
    return Memory(rss_bytes(), _probe("nvml", lambda: nvml_process_bytes(pid), report),
                  _probe("torch", torch_reserved_bytes, report))

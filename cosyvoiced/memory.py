"""Memory figures of the worker process: RSS from the OS, GPU from NVML and torch; and the
machine's memory, from which the default `worker.rss_limit` ("auto") is derived.

The GPU probes import nothing at module level: the supervisor uses `rss_bytes` and the
machine figures only and must never pull in torch or CUDA state.
"""

from __future__ import annotations

import ctypes
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


def _resident_pages(pid: int | None) -> tuple[int, int]:
    """(resident, of them shared with files or other processes) pages; (0, 0) if gone."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", encoding="ascii") as statm:
            fields = statm.read().split()
        return int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return 0, 0


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of `pid` (default: this process); 0 if it is gone."""
    return _resident_pages(pid)[0] * _PAGE_SIZE


def heap_bytes(pid: int | None = None) -> int:
    """Resident memory of `pid` (default: this process) less the pages it shares with
    files and other processes: its heap, not a file it maps and reads (the page cache's to
    keep or drop); 0 if it is gone."""
    resident, shared = _resident_pages(pid)
    return (resident - shared) * _PAGE_SIZE


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


# -- the default worker.rss_limit ("auto") --------------------------------------------------
# Resident memory an engine's worker needs to serve, with room for a long segment: Piper
# sits near 0.6 GiB; a CosyVoice model with torch several GiB. A limit under this would
# recycle a healthy worker after every job.
ENGINE_RSS_FLOOR = {"piper": 2 << 30, "cosyvoice": 8 << 30}
OTHER_ENGINE_RSS_FLOOR = 2 << 30
# The workers together may use half of the machine: the rest is the supervisor's, the page
# cache's, and everything else the host runs.
AUTO_RSS_SHARE = 0.5
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
_CGROUP_ROOT = "/sys/fs/cgroup"


def auto_rss_limit(machine_bytes: int, workers: int, engine: str) -> int:
    """worker.rss_limit = "auto": the machine's share for workers split among `workers`,
    never under what `engine` needs (its floor, also the figure when memory is unknown)."""
    floor = ENGINE_RSS_FLOOR.get(engine, OTHER_ENGINE_RSS_FLOOR)
    share = int(machine_bytes * AUTO_RSS_SHARE) // max(1, workers)
    return max(floor, share)


def parse_meminfo_total(meminfo: str) -> int:
    """MemTotal in bytes from /proc/meminfo's text; 0 if absent."""
    return parse_meminfo(meminfo, "MemTotal")


def parse_meminfo(meminfo: str, field: str) -> int:
    """One field of /proc/meminfo's text (MemTotal, MemAvailable...) in bytes; 0 if absent."""
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name == field and value.split():
            return int(value.split()[0]) * 1024  # always in kB
    return 0


def parse_cgroup_limit(text: str) -> int:
    """A cgroup memory limit file (v2 memory.max, v1 memory.limit_in_bytes); 0 for none."""
    value = text.strip()
    if not value.isdigit() or int(value) >= _UNLIMITED:
        return 0  # "max", or v1's huge number
    return int(value)


def _cgroup_limit_files(proc_cgroup: str) -> list[str]:
    """This process's cgroup memory limit files, and the namespace root's (a container)."""
    files = [f"{_CGROUP_ROOT}/memory.max", f"{_CGROUP_ROOT}/memory/memory.limit_in_bytes"]
    for line in proc_cgroup.splitlines():
        _hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            files.append(f"{_CGROUP_ROOT}{path.rstrip('/')}/memory.max")
        elif "memory" in controllers.split(","):
            files.append(f"{_CGROUP_ROOT}/memory{path.rstrip('/')}/memory.limit_in_bytes")
    return files


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as stream:
            return stream.read()
    except (OSError, UnicodeDecodeError):
        return ""


def machine_bytes() -> int:
    """Memory this daemon may use: MemTotal, or its cgroup's limit (systemd's MemoryMax=, a
    container's) where that is lower; 0 if unknown."""
    figures = [parse_meminfo_total(_read("/proc/meminfo")),
               *(parse_cgroup_limit(_read(path))
                 for path in _cgroup_limit_files(_read("/proc/self/cgroup")))]
    known = [figure for figure in figures if figure > 0]
    return min(known) if known else 0


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 << 10


def give_free_heap_back() -> bool:
    """Hand the allocator's free pages back to the system (glibc's malloc_trim, which also
    releases whole free pages between live objects). A Piper worker without onnxruntime's
    arena calls it after each segment: a long segment's tensors, freed, would otherwise
    stay resident in the heaps of the threads that made them. True if glibc released any."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False


def return_big_buffers_to_the_system() -> bool:
    """Give every buffer over 128 KiB (audio, results) a mapping of its own, unmapped when it
    is freed. glibc otherwise raises this threshold after the first big free and serves
    later buffers from the heap, whose top cannot shrink past a live small object: a
    daemon that runs for months would keep its peak forever. True if applied (glibc)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False

"""Whether this host's CPU multiplies bfloat16 matrices in hardware (no torch: the
supervisor's --check-config asks it).

`engine.cosyvoice.cpu_bf16` is worth it only there: with AMX-BF16 (Intel Sapphire Rapids and
later) or AVX512-BF16, oneDNN's bfloat16 products cost about the same for 1 to 16 rows,
where MKL's float32 ones cost 1.8x at 4; without them bfloat16 is emulated, and slower than
float32.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def bf16_flags(cpuinfo: str) -> frozenset[str]:
    """The bfloat16 matrix flags the first processor in a /proc/cpuinfo text has."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return BF16_FLAGS & frozenset(value.split())
    return frozenset()


def bf16_problem(cpuinfo: str | None = None) -> str | None:
    """Why `engine.cosyvoice.cpu_bf16` cannot pay off on this CPU; None if it can."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            return f"cannot read {CPUINFO} to see the CPU's flags ({error.strerror})"
    if bf16_flags(cpuinfo):
        return None
    return ("engine.cosyvoice.cpu_bf16 needs a CPU that multiplies bfloat16 in hardware "
            f"({' or '.join(sorted(BF16_FLAGS))} in /proc/cpuinfo); this one would emulate it, "
            "slower than float32: set it to false")

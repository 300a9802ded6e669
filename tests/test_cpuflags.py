"""engine.cosyvoice.cpu_bf16 is refused on a CPU that would emulate bfloat16 (cpuflags.py)."""

from __future__ import annotations

from cosyvoiced import cpuflags

# /proc/cpuinfo as a Sapphire Rapids guest and an older Xeon show it (flags cut short).
WITH_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1
"""
WITHOUT = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme avx2 avx512f avx512_vnni
"""


def test_the_bfloat16_flags_are_read_from_cpuinfo() -> None:
    assert cpuflags.bf16_flags(WITH_AMX) == {"amx_bf16", "avx512_bf16"}
    assert cpuflags.bf16_flags(WITHOUT) == frozenset()
    assert cpuflags.bf16_flags("") == frozenset()
    # a flag's name inside another's is not the flag
    assert cpuflags.bf16_flags("flags\t: xamx_bf16 avx512_bf16x\n") == frozenset()


def test_a_cpu_without_them_is_refused_with_the_reason() -> None:
    assert cpuflags.bf16_problem(WITH_AMX) is None
    problem = cpuflags.bf16_problem(WITHOUT)
    assert problem is not None
    assert "amx_bf16 or avx512_bf16" in problem
    assert "set it to false" in problem

"""What this CPU can do, from the ``flags`` line of ``/proc/cpuinfo``.

One parser for every feature batchdet asks about (the 8-bit dot product that
INT8 needs to pay, the bf16 arithmetic that ``--precision bf16`` needs), so
the answer to "which CPU is this" is read one way everywhere.
"""

from __future__ import annotations

from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The x86 feature flags of the first processor in ``cpuinfo`` (the text of
    ``/proc/cpuinfo``, read when None); None when it cannot tell (no x86
    ``flags`` line: another architecture, or no ``/proc/cpuinfo``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":  # the first processor speaks for all
            return frozenset(value.split())
    return None


def present(wanted: tuple[str, ...], cpuinfo: str | None = None) -> list[str] | None:
    """Those of ``wanted`` this CPU has, in ``wanted``'s order; ``[]`` for an x86
    CPU without any; None when it cannot tell (see :func:`cpu_flags`)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else [f for f in wanted if f in flags]

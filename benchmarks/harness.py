"""What every benchmark script shares: the machine and commit a figure belongs
to, and a table printed row by row as the measurements come (runs are long;
a reader should see each row when it is measured, not at the end)."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Iterable

HERE = Path(__file__).resolve().parent


def machine_info() -> dict:
    """CPU model and the flags that decide onnxruntime's speed (AVX-512, VNNI,
    AMX), memory and versions: figures are only comparable on one machine."""
    import onnxruntime
    import ray

    cpu_model = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("", platform.machine(), platform.processor()):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx")) or "vnni" in f]
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def commit() -> str:
    """The checkout's commit (``-dirty`` with local changes), or "unknown" outside git."""
    try:
        return subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header() -> dict:
    """The part of every results JSON that says where the figures come from; printed too."""
    info = {"machine": machine_info(), "commit": commit()}
    m = info["machine"]
    print(f"machine: {m['nproc']} CPUs, {m['cpu_model']} ({' '.join(m['cpu_flags'])}), commit {info['commit']}",
          flush=True)
    return info


def print_rows(table: Callable[[list[dict]], str], measurements: Iterable[dict]) -> list[dict]:
    """Print ``table``'s header, then each measurement's row as it arrives; return them all."""
    print(table([]), flush=True)
    results = []
    for result in measurements:
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
    return results


def parser(doc: str, sizes: str, what: str) -> argparse.ArgumentParser:
    """A script's arguments: ``--sizes`` (comma-separated numbers of ``what``) and ``--json``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--sizes", default=sizes, help=f"comma-separated numbers of {what}")
    p.add_argument("--json", dest="json_out", help="write the figures here")
    return p

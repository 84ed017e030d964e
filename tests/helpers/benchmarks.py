"""The benchmark scripts, for their tests: imported as modules (to test
their arithmetic on synthetic records) or run as scripts (their quick modes).
benchmarks/ is no package: its scripts import ``harness`` from their own folder."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def script(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def run_script(name: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> str:
    """benchmarks/<name>.py ``args`` in a fresh interpreter; its output, after checking it succeeded."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout

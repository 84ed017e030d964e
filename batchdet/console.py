"""What a run shows on the terminal: one progress line, then the summary.

Everything else a run prints (Ray's start-up and execution logs, its C++
core's lines, the workers' output it forwards, library warnings) goes to a
log file that the summary names. That is done at the file-descriptor level,
so output from C++ and from child processes is caught too, not only Python's
``logging``. ``--verbose`` leaves the terminal as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, TextIO

from batchdet.progress import ProgressLine


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``, for the commands that run detect on this terminal."""
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own log lines on the terminal instead of a log file")


def log_path() -> Path:
    """A new log file for one command: ``$TMPDIR/batchdet-logs/<time>-<pid>.log``.
    Not ``$TMPDIR/batchdet``: Ray puts the driver's working directory on its
    workers' path, and a folder named like the package there would shadow it."""
    folder = Path(tempfile.gettempdir()) / "batchdet-logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (fds 1 and 2, and what its
    children inherit) to ``log``; yield a stream on the real terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


@contextlib.contextmanager
def run_console(verbose: bool) -> Iterator[tuple[ProgressLine, Path | None]]:
    """(progress callback, log file or None) for one ``detect``: quiet with a
    log file unless ``verbose``."""
    if verbose:
        line = ProgressLine(sys.stderr)
        try:
            yield line, None
        finally:
            line.close()
        return
    log = log_path()
    with quiet(log) as terminal:
        line = ProgressLine(terminal)
        try:
            yield line, log
        finally:
            line.close()

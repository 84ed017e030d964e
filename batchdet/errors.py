"""Exceptions as the one line batchdet shows users (reports, table cells, CLI errors)."""

from __future__ import annotations

import re

#: Terminal colour codes, which Ray puts around task names in its errors.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class TaskFailed(RuntimeError):
    """A task or actor of the run failed: ``str()`` is its root cause as one line
    (``OSError: [Errno 28] No space left on device: '…'``), never Ray's wrapper;
    the cause itself is ``__cause__``."""

    def __init__(self, cause: BaseException):
        super().__init__(one_line(cause))


def one_line(error: object, *, with_type: bool = True) -> str:
    """``"OSError: <first line>"``, or just the line: a traceback-length message must not break a one-line report.

    ``error`` is usually an exception, but any object (an ``OSError.strerror``,
    a ``URLError.reason``) works. An empty message gives the type's name alone.
    """
    text = next((line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()), "")
    name = type(error).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text

"""Exceptions as the one line batchdet shows users (reports, table cells, CLI errors)."""

from __future__ import annotations


def one_line(error: object, *, with_type: bool = True) -> str:
    """``"OSError: <first line>"``, or just the line: a traceback-length message must not break a one-line report.

    ``error`` is usually an exception, but any object (an ``OSError.strerror``,
    a ``URLError.reason``) works. An empty message gives the type's name alone.
    """
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    name = type(error).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text

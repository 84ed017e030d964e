"""Fetch image bytes, a batch at a time, turning every failure into a per-image error.

On async filesystems (s3fs, gcsfs, http) a batch is fetched concurrently, which
keeps object storage latency from becoming the bottleneck. Paths are read
as given, never glob-expanded, so keys containing ``*``, ``?`` or ``[`` work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fsspec.asyn import sync
from fsspec.core import url_to_fs

from batchdet.preprocess import ImageError


def read_many(uris: list[str], storage_options: dict[str, Any] | None = None) -> list[bytes | ImageError]:
    """Bytes of each URI, or an ``ImageError("ReadError", …)`` in its place."""
    groups: dict[int, tuple[Any, list[int], list[str]]] = {}
    for i, uri in enumerate(uris):
        fs, path = url_to_fs(uri, **(storage_options or {}))
        _, indices, paths = groups.setdefault(id(fs), (fs, [], []))
        indices.append(i)
        paths.append(path)
    results: list[bytes | ImageError] = [b""] * len(uris)
    for fs, indices, paths in groups.values():
        for i, value in zip(indices, _cat_all(fs, paths)):
            results[i] = _as_result(value)
    return results


def _cat_all(fs: Any, paths: list[str]) -> list[bytes | BaseException]:
    if getattr(fs, "async_impl", False):
        return sync(fs.loop, _gather, fs, paths)
    out: list[bytes | BaseException] = []
    for path in paths:
        try:
            out.append(fs.cat_file(path))
        except Exception as e:
            out.append(e)
    return out


async def _gather(fs: Any, paths: list[str]) -> list[bytes | BaseException]:
    return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)


def _as_result(value: bytes | BaseException) -> bytes | ImageError:
    if isinstance(value, bytes):
        return value
    if isinstance(value, FileNotFoundError):
        return ImageError("ReadError", "not found (deleted after listing?)")
    if isinstance(value, PermissionError):
        return ImageError("ReadError", f"access denied: {value}")
    text = str(value).splitlines()[0] if str(value) else ""
    return ImageError("ReadError", f"{type(value).__name__}: {text}" if text else type(value).__name__)

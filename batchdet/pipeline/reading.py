"""Fetch image bytes, a batch at a time, turning every failure into a per-image error.

On async filesystems (s3fs, gcsfs, http) a batch is fetched concurrently, which
keeps object storage latency from becoming the bottleneck. Paths are read
as given, never glob-expanded, so keys containing ``*``, ``?`` or ``[`` work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fsspec.asyn import sync

from batchdet.errors import one_line
from batchdet.pipeline.preprocess import ImageError
from batchdet.storage import filesystem

#: Largest file read (bytes). With the decoder's pixel limit this bounds the
#: memory one image can take, whatever its header or its size claims.
MAX_FILE_BYTES = 256 * 1024 * 1024


def read_many(
    uris: list[str], storage_options: dict[str, Any] | None = None, max_bytes: int = MAX_FILE_BYTES
) -> list[bytes | ImageError]:
    """Bytes of each URI, or an ``ImageError`` (``ReadError``, ``FileTooLarge``) in its place.

    At most ``max_bytes + 1`` bytes are fetched (a ranged read on object
    storage), so an oversized file costs no more memory than the limit.
    """
    groups: dict[int, tuple[Any, list[int], list[str]]] = {}
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri, storage_options)
        _, indices, paths = groups.setdefault(id(fs), (fs, [], []))
        indices.append(i)
        paths.append(path)
    results: list[bytes | ImageError] = [b""] * len(uris)
    for fs, indices, paths in groups.values():
        for i, value in zip(indices, _cat_all(fs, paths, max_bytes + 1)):
            results[i] = _as_result(value, max_bytes)
    return results


def _cat_all(fs: Any, paths: list[str], end: int) -> list[bytes | BaseException]:
    if getattr(fs, "async_impl", False):
        return sync(fs.loop, _gather, fs, paths, end)
    out: list[bytes | BaseException] = []
    for path in paths:
        try:
            out.append(fs.cat_file(path, start=0, end=end))
        except Exception as e:
            out.append(e)
    return out


async def _gather(fs: Any, paths: list[str], end: int) -> list[bytes | BaseException]:
    return await asyncio.gather(*(fs._cat_file(p, start=0, end=end) for p in paths), return_exceptions=True)


def _as_result(value: bytes | BaseException, max_bytes: int) -> bytes | ImageError:
    if isinstance(value, bytes):
        if len(value) > max_bytes:
            return ImageError("FileTooLarge", f"larger than the {max_bytes:,}-byte limit")
        return value
    if isinstance(value, OSError) and "range is not satisfiable" in str(value):
        return b""  # S3 answers a ranged read of a zero-byte object with 416 InvalidRange
    if isinstance(value, FileNotFoundError):
        return ImageError("ReadError", "not found (deleted after listing?)")
    if isinstance(value, PermissionError):
        return ImageError("ReadError", f"access denied: {value}")
    return ImageError("ReadError", one_line(value))

"""Getting the official weights, and deciding which model file to use.

The official ``resnet34-ssd1200.onnx`` is 80 MB and lives on Zenodo (with an
Open Model Zoo mirror). Downloads of that size get cut off, proxies hand back
HTML error pages, and two jobs may fetch at once, so :func:`fetch_model`
never lets a partial or wrong file appear at the destination: it streams into
a temporary file beside it, checks length and sha256, and only then renames
it into place atomically. Air-gapped machines copy the file around and point
``fetch_model`` at a ``file://`` URL or a plain path; the same checks apply.
"""

from __future__ import annotations

import http.client
import inspect
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from batchdet.errors import one_line
from batchdet.files import CHUNK, cache_root, save_verified, sha256_of_file
from batchdet.model.spec import MIRROR_URL, OFFICIAL_NAME, OFFICIAL_SHA256, OFFICIAL_SIZE, OFFICIAL_URL

#: ``progress(bytes_so_far, total_or_None)``, called after every chunk.
Progress = Callable[[int, int | None], None]

MODEL_ENV = "BATCHDET_MODEL"
_USER_AGENT = "batchdet-fetch/1 (+python urllib)"


class FetchError(ValueError):
    """The model could not be fetched; the one-line message says why."""


def default_model_path() -> Path:
    """Where a fetched model lives by default: the user's cache, per XDG."""
    return cache_root() / OFFICIAL_NAME


def resolve_model_path(explicit: str | os.PathLike | None = None) -> Path:
    """The model file to use: ``explicit`` > ``$BATCHDET_MODEL`` > :func:`default_model_path`.

    Existence is not checked here: callers validate with ``spec.check_model``,
    which gives the user one line saying what is wrong with the file.
    """
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env).expanduser()
    return default_model_path()


def fetch_model(
    url: str | None = None,
    to: str | os.PathLike | None = None,
    sha256: str = OFFICIAL_SHA256,
    size: int | None = OFFICIAL_SIZE,
    timeout: float = 60,
    progress: Progress | None = None,
) -> Path:
    """Download the model to ``to`` (default :func:`default_model_path`) and return its path.

    ``url`` may be http(s)://, file:// or a local path. Without ``url`` the
    official Zenodo URL is tried first and the mirror if that fails. If ``to``
    already holds a file with the right sha256 nothing is downloaded. If ``to``
    is an existing directory the file is saved inside it as ``OFFICIAL_NAME``.
    Raises :class:`FetchError` with one line on any failure, leaving nothing
    behind (an existing file at ``to`` is only ever replaced by a verified one).
    """
    dest = Path(to).expanduser() if to is not None else default_model_path()
    if dest.is_dir():
        dest = dest / OFFICIAL_NAME
    sha256 = sha256.lower()
    if _already_there(dest, sha256, size):
        return dest
    if url is not None:
        _download(url, dest, sha256, size, timeout, progress)
        return dest
    # Module globals read at call time, so tests (and forks) can repoint them.
    try:
        _download(OFFICIAL_URL, dest, sha256, size, timeout, progress)
    except FetchError as official:
        try:
            _download(MIRROR_URL, dest, sha256, size, timeout, progress)
        except FetchError as mirror:
            raise FetchError(f"{official}; mirror also failed: {mirror}") from None
    return dest


def _already_there(dest: Path, sha256: str, size: int | None) -> bool:
    """True if ``dest`` is already the wanted file (size checked first: hashing 80 MB is slow)."""
    try:
        if not dest.is_file() or (size is not None and dest.stat().st_size != size):
            return False
        return sha256_of_file(dest) == sha256
    except OSError:
        return False


def _to_url(source: str) -> str:
    """http(s)/file URLs pass through; a plain path becomes a file:// URL."""
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https", "file"):
        return source
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, i.e. a path
        raise FetchError(f"unsupported URL scheme {scheme!r} in {source} (use http, https, file or a path)")
    return Path(source).expanduser().resolve().as_uri()


def _download(source: str, dest: Path, sha256: str, size: int | None, timeout: float, progress: Progress | None) -> None:
    """Stream ``source`` into a temp file beside ``dest``, verify, rename into place."""
    url = _to_url(source)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot write to {dest.parent}: {one_line(e.strerror or e, with_type=False)}") from None
    chunks = _stream(source, url, size, timeout, progress)
    try:
        save_verified(chunks, dest.parent, dest.name, sha256, source=source, error=FetchError)
    except OSError as e:  # the stream starts once the temp file is open: before that, the folder refused it
        where = f"to {dest.parent}" if inspect.getgeneratorstate(chunks) == inspect.GEN_CREATED else dest
        raise FetchError(f"cannot write {where}: {one_line(e.strerror or e, with_type=False)}") from None


def _stream(source: str, url: str, size: int | None, timeout: float, progress: Progress | None) -> Iterator[bytes]:
    """The body of ``url``, chunk by chunk; FetchError on anything wrong (the caller checks the sha256)."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise FetchError(f"HTTP {e.code} for {source}") from None
    except urllib.error.URLError as e:
        raise FetchError(f"cannot reach {source}: {one_line(e.reason, with_type=False)}") from None
    except (OSError, http.client.HTTPException) as e:  # e.g. a timeout during the TLS handshake
        raise FetchError(f"cannot reach {source}: {one_line(e, with_type=False)}") from None
    with response:
        header = response.headers.get("Content-Length")
        announced = int(header) if header and header.isdigit() else None
        if announced is not None and size is not None and announced != size:
            raise FetchError(f"{source} is {announced} bytes, expected {size} (wrong file?)")
        total = announced if announced is not None else size
        received = 0
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:  # IncompleteRead, reset, timeout
                raise FetchError(
                    f"download of {source} cut off after {received} of {total or '?'} bytes ({type(e).__name__})"
                ) from None
            if not chunk:
                break
            received += len(chunk)
            if size is not None and received > size:
                raise FetchError(f"{source} is larger than the expected {size} bytes (wrong file?)")
            yield chunk
            if progress is not None:
                progress(received, total)
    if total is not None and received < total:
        raise FetchError(f"download of {source} cut off after {received} of {total} bytes")


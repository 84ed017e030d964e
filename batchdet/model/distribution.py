"""Model distribution: every node gets its own verified copy of a model URL.

``--model`` may be ``s3://``, ``gs://``, ``https://`` or any fsspec URL. The
driver and every inference actor call :func:`local_model`, which fetches the
file once per node into a node-local cache::

    $BATCHDET_MODEL_CACHE            (if set), else
    $XDG_CACHE_HOME/batchdet/models  (if set), else
    ~/.cache/batchdet/models

and names it by content: ``<sha256>.onnx``. Concurrent actors on one node
share the download: a file lock per model serialises them, the first streams
the bytes into a temporary file beside the target while hashing them, and
only a file whose sha256 is right is renamed into place (atomically, so no
actor ever sees half a model). The others find it there and only verify it.

A model reference can pin its checksum in a URL fragment, as pip does:
``s3://bucket/models/resnet34-ssd1200.onnx#sha256=b417a8…``. Without one the
driver learns the sha256 from its own download, and the run hands
``URL#sha256=…`` to the actors, so every node verifies it runs exactly the
file the driver checked, even if the object is replaced mid-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from batchdet.errors import one_line
from batchdet.files import CHUNK, atomic_write, cache_folder, save_verified, sha256_of_file

CACHE_ENV = "BATCHDET_MODEL_CACHE"
SHA_FRAGMENT = "#sha256="
#: How long an actor waits for another process on its node to finish a download.
LOCK_TIMEOUT_S = 1800.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("batchdet")


class DistributionError(ValueError):
    """The model could not be fetched or verified; the one-line message says why."""


# --- references ---------------------------------------------------------------
def split_ref(ref: str | os.PathLike) -> tuple[str, str | None]:
    """``"s3://b/m.onnx#sha256=ab…"`` → ``("s3://b/m.onnx", "ab…")``; no fragment → (ref, None)."""
    text = os.fspath(ref)
    location, sep, digest = text.partition(SHA_FRAGMENT)
    if not sep:
        return text, None
    return location, check_sha256(digest, f"the sha256 in {text!r}")


def model_ref(location: str, sha256: str) -> str:
    """The reference that pins ``location`` to one exact file."""
    return f"{location}{SHA_FRAGMENT}{check_sha256(sha256)}"


def check_sha256(value: str, what: str = "sha256") -> str:
    """Lower-case 64-hex-digit ``value``, or DistributionError."""
    digest = str(value).strip().lower()
    if not _HEX64.fullmatch(digest):
        raise DistributionError(f"{what} must be 64 hexadecimal digits, got {value!r}")
    return digest


def is_remote(ref: str | os.PathLike) -> bool:
    """True for URLs that have to be fetched (s3://, https://, gs://, …);
    False for local paths and file:// URLs (a one-letter scheme is a Windows drive)."""
    scheme = urlsplit(split_ref(ref)[0]).scheme.lower()
    return len(scheme) > 1 and scheme not in ("file", "local")


def _local_path(location: str) -> Path:
    if location.startswith("file://"):
        return Path(urlsplit(location).path)
    return Path(location).expanduser()


def model_cache_dir() -> Path:
    """This node's model cache (see the module docstring)."""
    return cache_folder("models", env=CACHE_ENV)


# --- the one entry point ------------------------------------------------------
def local_model(
    url_or_path: str | os.PathLike,
    sha256: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local, verified copy of the model at ``url_or_path``.

    Local paths (and file:// URLs) are returned as they are, after checking
    their sha256 when one is given. Remote URLs are fetched once per node into
    the cache (see the module docstring) and verified against ``sha256`` or
    the reference's ``#sha256=`` fragment when either is given. Storage
    options apply to fsspec URLs (s3://, gs://, …), not to http(s)://, which
    are fetched as they are (public or pre-signed URLs).
    """
    location, pinned = split_ref(url_or_path)
    want = check_sha256(sha256) if sha256 else None
    if pinned and want and pinned != want:
        raise DistributionError(f"conflicting sha256 for {location}: {pinned} in the URL, {want} given")
    want = want or pinned
    if not is_remote(location):
        path = _local_path(location)
        if want:
            _verify_local(path, want)
        return path
    cache = Path(cache_dir).expanduser() if cache_dir else model_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = one_line(e.strerror or e, with_type=False)
        raise DistributionError(f"cannot create the model cache {cache}: {reason}") from None
    if want:
        return _fetch_pinned(location, want, cache, storage_options)
    return _fetch_unpinned(location, cache, storage_options)


def resolve_model(model: str | os.PathLike | None, storage_options: dict[str, Any] | None = None):
    """The driver's side: check the model a run will use and say where it came from.

    Returns the :class:`~batchdet.model.spec.ModelInfo` of the file. For a remote
    model, ``info.path`` is the pinned reference ``URL#sha256=<hex>`` (what
    the run manifest records and what the actors fetch); the driver's checked
    copy sits in its cache. Local models behave exactly as before.
    """
    from batchdet.model.fetch import MODEL_ENV, resolve_model_path
    from batchdet.model.spec import check_model

    ref = os.fspath(model) if model else os.environ.get(MODEL_ENV)
    if ref and is_remote(ref):
        location, _ = split_ref(ref)
        info = check_model(local_model(ref, storage_options=storage_options))
        return dataclasses.replace(info, path=model_ref(location, info.sha256))
    if ref and split_ref(ref)[1]:
        return check_model(local_model(ref))
    return check_model(resolve_model_path(model))


# --- internals ----------------------------------------------------------------
def _verify_local(path: Path, want: str) -> None:
    if not path.is_file():
        raise DistributionError(f"model file not found on node {socket.gethostname()}: {path}")
    got = sha256_of_file(path)
    if got != want:
        raise DistributionError(f"sha256 mismatch for {path}: got {got}, expected {want}")


def _cached(target: Path, want: str) -> bool:
    """True if ``target`` is there and is the wanted file (a bad one is removed)."""
    if not target.is_file():
        return False
    if sha256_of_file(target) == want:
        return True
    target.unlink(missing_ok=True)  # bit rot or tampering: fetch it again
    return False


def _lock(path: Path):
    from filelock import FileLock  # a Ray dependency; released by the OS if a holder dies

    return FileLock(str(path), timeout=LOCK_TIMEOUT_S)


def _locked(lock, location: str):
    from filelock import Timeout

    try:
        return lock.acquire()
    except Timeout:
        raise DistributionError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for another process to download {location} (lock {lock.lock_file})"
        ) from None


def _fetch_pinned(location: str, want: str, cache: Path, options: dict[str, Any] | None) -> Path:
    target = cache / f"{want}.onnx"
    if _cached(target, want):
        return target
    lock = _lock(cache / f".{want}.lock")
    with _locked(lock, location):
        if not _cached(target, want):  # another actor may have fetched it while we waited
            _download(location, cache, options, want)
    return target


def _fetch_unpinned(location: str, cache: Path, options: dict[str, Any] | None) -> Path:
    """No sha256 known: reuse the copy fetched earlier from the same URL if the
    object's size and ETag/mtime are unchanged, else download and learn it."""
    key = hashlib.sha256(location.encode()).hexdigest()[:32]
    index = cache / "urls" / f"{key}.json"
    lock = _lock(cache / f".url-{key}.lock")
    with _locked(lock, location):
        stamp = _stamp(location, options)
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        if stamp and known.get("url") == location and known.get("stamp") == stamp:
            target = cache / f"{known.get('sha256')}.onnx"
            if _HEX64.fullmatch(str(known.get("sha256"))) and _cached(target, known["sha256"]):
                return target
        digest = _download(location, cache, options, None)
        if stamp:
            index.parent.mkdir(exist_ok=True)
            with atomic_write(index) as f:
                f.write(json.dumps({"url": location, "stamp": stamp, "sha256": digest}).encode())
    return cache / f"{digest}.onnx"


def _filesystem(location: str, options: dict[str, Any] | None):
    from batchdet.storage import filesystem

    http = urlsplit(location).scheme.lower() in ("http", "https")
    return filesystem(location, None if http else options)


def _stamp(location: str, options: dict[str, Any] | None) -> list | None:
    """What identifies this version of the object, or None when nothing does
    (size alone is not enough to trust a cached copy)."""
    try:
        fs, path = _filesystem(location, options)
        info = fs.info(path)
    except Exception:
        return None
    version = next(
        (str(info[k]) for k in ("ETag", "etag", "md5Hash", "VersionId", "LastModified", "mtime", "updated")
         if info.get(k)),
        None,
    )
    return [info.get("size"), version] if version else None


def _download(location: str, cache: Path, options: dict[str, Any] | None, want: str | None) -> str:
    """Stream ``location`` into a temp file in ``cache``, verify, rename to ``<sha256>.onnx``."""
    try:
        fs, path = _filesystem(location, options)
    except Exception as e:
        raise DistributionError(f"cannot open model {location}: {one_line(e)}") from None
    log.info("node %s: fetching model %s into %s", socket.gethostname(), location, cache)
    try:
        return save_verified(_chunks(fs, path, location), cache, lambda got: f"{got}.onnx", want,
                             source=location, error=DistributionError)
    except OSError as e:  # of the local disk (the source's errors come as DistributionError)
        raise DistributionError(f"cannot fetch model {location}: {one_line(e)}") from None


def _chunks(fs: Any, path: str, location: str) -> Iterator[bytes]:
    """The object's bytes; its errors as one DistributionError line."""
    try:
        with fs.open(path, "rb") as src:
            yield from iter(lambda: src.read(CHUNK), b"")
    except FileNotFoundError:
        raise DistributionError(f"model not found: {location}") from None
    except Exception as e:
        raise DistributionError(f"cannot fetch model {location}: {one_line(e)}") from None

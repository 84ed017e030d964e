"""Files batchdet writes whole or checks by hash, and where it caches them.

Models are large and downloaded by many processes at once, and lease and
manifest records are read while other processes replace them, so nothing is
ever written in place: :class:`AtomicFile` writes under a temporary name
beside the target and renames it over the target in one step, and
:func:`save_verified` only does so once the bytes' sha256 is right.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import fsspec

#: bytes read or written per step when streaming a file (models are 80 MB)
CHUNK = 1 << 20
#: fsspec protocols whose single PUT replaces an object whole, so no temporary name is needed there
WHOLE_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


# --- hashes and the cache ----------------------------------------------------------
def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed so an 80 MB model is never held in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/batchdet``, else ``~/.cache/batchdet``: one place for every cache, per XDG."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "batchdet"


def cache_folder(name: str, env: str | None = None) -> Path:
    """``$<env>`` when set (so a node can put one cache elsewhere), else ``cache_root() / name``."""
    explicit = os.environ.get(env) if env else None
    return Path(explicit).expanduser() if explicit else cache_root() / name


# --- writing whole -------------------------------------------------------------------
def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (POSIX); harmless to skip where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary name beside ``target`` that :meth:`commit` renames over it: readers never see half a file.

    Use as a context manager: whatever is at :attr:`temp` when the block ends
    without :meth:`commit` (an error, Ctrl-C) is removed. :attr:`temp` is a
    path, for writers that want one (onnx.save, onnxruntime); nothing is
    created there until the writer does.
    """

    def __init__(self, target: str | os.PathLike, *, suffix: str = ".tmp") -> None:
        self.target = Path(target)
        self.temp = self.target.with_name(f".{self.target.name}.{uuid.uuid4().hex}{suffix}")

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.temp.unlink(missing_ok=True)

    def commit(self, target: str | os.PathLike | None = None) -> Path:
        """Rename :attr:`temp` over ``target`` (default :attr:`target`, which must be in the same folder)."""
        final = Path(target) if target is not None else self.target
        os.replace(self.temp, final)
        fsync_dir(final.parent)
        return final


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, *, suffix: str = ".tmp", mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a file whose bytes replace ``target`` only if the block ends without an error (synced first).

    ``mode`` sets the permissions (else the umask's): the file is created
    under a temporary name, so it cannot inherit the target's.
    """
    with AtomicFile(target, suffix=suffix) as file:
        with open(file.temp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(file.temp, mode)
        file.commit()


def replace_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` on any fsspec filesystem with ``data`` whole: a reader gets the old bytes or the new."""
    from batchdet.storage import is_local

    if is_local(fs):
        with atomic_write(path) as f:
            f.write(data)
        return
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & WHOLE_PUT_PROTOCOLS:
        fs.pipe_file(path, data)  # an object store's PUT is atomic
        return
    temp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        fs.pipe_file(temp, data)
        fs.mv(temp, path)  # a rename, where the filesystem has one
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(temp)
        raise


# --- downloads ---------------------------------------------------------------------------
def save_verified(
    chunks: Iterable[bytes],
    directory: str | os.PathLike,
    name: str | Callable[[str], str],
    sha256: str | None = None,
    *,
    source: str,
    error: type[Exception] = ValueError,
) -> str:
    """Stream ``chunks`` into ``directory/name`` and return their sha256; a cut-off or wrong download never lands.

    The bytes go to a temporary ``.part`` file there, hashed as they are
    written, and are renamed to ``name`` (or ``name(sha256)``, to name a file
    by its content) only once complete and, when ``sha256`` is given, equal
    to it; else ``error("sha256 mismatch for <source>: …")``. An error raised
    by ``chunks`` (the source's own, one line) propagates, as do OSErrors of
    the local disk; the temporary file is removed either way.
    """
    folder = Path(directory)
    with AtomicFile(folder / (name if isinstance(name, str) else "download"), suffix=".part") as file:
        digest = hashlib.sha256()
        with open(file.temp, "xb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # the data must be on disk before the rename makes it visible
        got = digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise error(f"sha256 mismatch for {source}: got {got}, expected {sha256}")
        file.commit(folder / (name if isinstance(name, str) else name(got)))
    return got

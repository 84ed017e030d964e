"""Find the images of a dataset: a folder/prefix searched recursively, a glob,
or one file, on any fsspec filesystem."""

from __future__ import annotations

import dataclasses
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable

from batchdet.errors import one_line
from batchdet.storage import filesystem, full_uri

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: A URL naming one file with these endings is a list of image URIs, for
#: buckets too large to list: text (one per line), or CSV/Parquet with a ``uri`` column.
MANIFEST_EXTENSIONS = frozenset({".txt", ".csv", ".parquet"})
GLOB_CHARS = frozenset("*?[")
#: Folders (prefixes) listed at once. Object stores answer a listing a page of
#: 1,000 keys at a time, one request after another; sub-prefixes listed side
#: by side divide that wait (docs/notes/2026-12-02-scale.md).
LIST_WORKERS = 16
#: How many folder levels to open, at most, looking for LIST_WORKERS prefixes.
LIST_DEPTH = 3


@dataclass(frozen=True)
class Listing:
    """The images found under one URL, in a stable (sorted) order, with what
    the store said of each when listed: its size and its version token
    (:func:`version_token`), None where the listing does not tell (a list of
    URIs). ``--resume`` skips an image whose size and token match its row's
    without reading it."""

    url: str
    uris: list[str]
    skipped: int  # files that are not images by their extension
    seconds: float  # what listing cost, logged because large buckets are slow to list
    sizes: list[int | None] | None = None  # parallel to uris; None: not told by the listing
    versions: list[str | None] | None = None

    def only(self, keep: list[bool]) -> "Listing":
        """The same listing with only the images where ``keep`` is true."""
        pick = lambda values: None if values is None else [v for v, k in zip(values, keep) if k]  # noqa: E731
        return dataclasses.replace(self, uris=pick(self.uris), sizes=pick(self.sizes), versions=pick(self.versions))


#: Keys of an fsspec info dict that identify an object's content version,
#: by preference: S3's (and most object stores') ETag, GCS's generation,
#: then a modification time (local files, and stores without an ETag).
VERSION_KEYS = ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "updated")


def version_token(info: dict[str, Any]) -> str | None:
    """The store's own token for the version of an object, as text: it changes
    whenever the object is written (S3's ETag, a local file's mtime), so an
    unchanged token with an unchanged size means unchanged bytes. None when
    the filesystem gives none."""
    for key in VERSION_KEYS:
        value = info.get(key)
        if value is not None and value != "":
            return f"{key}:{str(value).strip(chr(34))}"
    return None


def is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(url: str, storage_options: dict[str, Any] | None = None,
                on_progress: Callable[[int], None] | None = None) -> Listing:
    """List ``url``'s image files; raise ValueError with one line when there are none.

    A folder is listed by sub-folder, several at once (:func:`find_files`),
    telling ``on_progress`` how many files were found so far. Storage failures
    (unknown bucket, missing credentials, access denied) are re-raised as
    ValueError naming the URL, so the CLI can refuse the run before any work
    starts.
    """
    start = time.perf_counter()
    fs, path = filesystem(url, storage_options)
    # fsspec keeps filesystems, and their listings, for the life of the process:
    # a second run must see the store as it is now (--resume compares tokens)
    fs.invalidate_cache()
    if posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS:
        uris = _read_manifest(fs, path, url)
        return Listing(url, uris, 0, time.perf_counter() - start)
    try:
        if GLOB_CHARS & set(path):
            files = {p: _identity(info) for p, info in fs.glob(path, detail=True).items()
                     if info.get("type") != "directory"}
        elif fs.isdir(path):
            files = find_files(fs, path, on_progress=on_progress)
        elif fs.isfile(path):
            files = {path: _identity(fs.info(path))}
        else:
            raise ValueError(f"{url}: no such folder, prefix or file")
    except ValueError:
        raise
    except Exception as e:  # s3fs/botocore raise many types; the message is what matters
        raise ValueError(f"cannot list {url}: {one_line(e)}") from None
    images = sorted((full_uri(fs, p), identity) for p, identity in files.items() if is_image_name(p))
    if not images:
        raise ValueError(f"no images under {url} ({len(files)} other file(s) skipped)")
    return Listing(url, [uri for uri, _ in images], len(files) - len(images), time.perf_counter() - start,
                   sizes=[size for _, (size, _) in images], versions=[version for _, (_, version) in images])


def _identity(info: dict[str, Any]) -> tuple[int | None, str | None]:
    """(size, version token) of a listed file: all a listing keeps of its info
    (a million info dicts would hold gigabytes)."""
    size = info.get("size")
    return (None if size is None else int(size)), version_token(info)


def find_files(fs, path: str, workers: int = LIST_WORKERS, depth: int = LIST_DEPTH,
               on_progress: Callable[[int], None] | None = None) -> dict[str, tuple[int | None, str | None]]:
    """Every file under folder ``path``, as ``fs.find`` gives them, with its
    (size, version token), found ``workers`` sub-folders at a time: open
    folders level by level (up to ``depth``) until there are ``workers`` of
    them, then ``find`` each whole. A flat folder is one listing, as before."""
    files: dict[str, tuple[int | None, str | None]] = {}

    def report() -> None:
        if on_progress is not None:
            on_progress(len(files))

    with ThreadPoolExecutor(workers) as pool:
        folders = [path]
        for _ in range(depth):
            if not folders or len(folders) >= workers:
                break
            below: list[str] = []
            for future in as_completed([pool.submit(fs.ls, folder, detail=True) for folder in folders]):
                for entry in future.result():
                    if entry["name"].rstrip("/") in folders:  # a store's marker of the folder itself
                        continue
                    if entry["type"] == "directory":
                        below.append(entry["name"])
                    else:
                        files[entry["name"]] = _identity(entry)
                report()
            folders = below
        for future in as_completed([pool.submit(fs.find, folder, detail=True) for folder in folders]):
            files.update((name, _identity(info)) for name, info in future.result().items())
            report()
    return files


def _read_manifest(fs, path: str, url: str) -> list[str]:
    """URIs listed in a manifest file, duplicates dropped (first kept), relative
    entries resolved against the manifest's folder."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            if path.lower().endswith(".txt"):
                entries = [line.strip() for line in f.read().decode("utf-8").splitlines()]
                entries = [e for e in entries if e and not e.startswith("#")]
            else:
                table = pq.read_table(f) if path.lower().endswith(".parquet") else pyarrow.csv.read_csv(f)
                if "uri" not in table.column_names:
                    raise ValueError(f"manifest {url} has no 'uri' column (columns: {table.column_names})")
                entries = [e for e in table.column("uri").to_pylist() if e]
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read manifest {url}: {one_line(e)}") from None
    base = full_uri(fs, posixpath.dirname(path))
    uris = list(dict.fromkeys(e if "://" in e or e.startswith("/") else f"{base}/{e}" for e in entries))
    if not uris:
        raise ValueError(f"manifest {url} lists no images")
    return uris

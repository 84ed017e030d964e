"""Find the images of a dataset: a folder/prefix searched recursively, a glob,
or one file, on any fsspec filesystem."""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any

from batchdet.storage import filesystem, full_uri

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Listing:
    """The images found under one URL, in a stable (sorted) order."""

    url: str
    uris: list[str]
    skipped: int  # files that are not images by their extension
    seconds: float  # what listing cost, logged because large buckets are slow to list


def is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(url: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """List ``url``'s image files; raise ValueError with one line when there are none.

    Storage failures (unknown bucket, missing credentials, access denied) are
    re-raised as ValueError naming the URL, so the CLI can refuse the run
    before any work starts.
    """
    start = time.perf_counter()
    fs, path = filesystem(url, storage_options)
    try:
        if GLOB_CHARS & set(path):
            files = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"]
        elif fs.isdir(path):
            files = fs.find(path)
        elif fs.isfile(path):
            files = [path]
        else:
            raise ValueError(f"{url}: no such folder, prefix or file")
    except ValueError:
        raise
    except Exception as e:  # s3fs/botocore raise many types; the message is what matters
        raise ValueError(f"cannot list {url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    images = sorted(full_uri(fs, p) for p in files if is_image_name(p))
    if not images:
        raise ValueError(f"no images under {url} ({len(files)} other file(s) skipped)")
    return Listing(url, images, len(files) - len(images), time.perf_counter() - start)

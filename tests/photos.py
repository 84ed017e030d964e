"""Real photographs for tests, from the files scikit-image ships (read as
files; skimage itself is never imported, so no network and no scipy)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def photo_path(name: str) -> Path:
    """``rocket.jpg`` (640×427 JPEG), ``retina.jpg`` (1411×1411 JPEG),
    ``chelsea.png`` (451×300 RGB PNG), ``camera.png`` (512×512 grey PNG), ..."""
    return Path(str(files("skimage") / "data" / name))


def photo(name: str) -> bytes:
    return photo_path(name).read_bytes()

"""Real photographs for tests: the public-domain and CC0 ones among the
files scikit-image ships, copied into tests/photos (its README.md names each
one's source and licence)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


#: the folder of photographs; benchmarks/harness.py finds it too
PHOTOS_DIR = Path(__file__).resolve().parents[1] / "photos"

#: 16 real scenes, colour and grey, 102 to 1411 pixels a side, JPEG and PNG
REAL_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
               "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
               "microaneurysms.png", "retina.jpg", "rocket.jpg", "text.png")


def photo_path(name: str) -> Path:
    """``rocket.jpg`` (640×427 JPEG), ``retina.jpg`` (1411×1411 JPEG),
    ``chelsea.png`` (451×300 RGB PNG), ``camera.png`` (512×512 grey PNG), ..."""
    return PHOTOS_DIR / name


def photo(name: str) -> bytes:
    return photo_path(name).read_bytes()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """``im`` as the bytes of a ``fmt`` file."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width×height."""
    png = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = png[8 + 8 : 8 + 8 + 13]
    new = struct.pack(">II", width, height) + ihdr[8:]
    chunk = b"IHDR" + new
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[8 + 8 + 13 + 4 :]

"""Real photographs for tests, from the files scikit-image ships (read as
files; skimage itself is never imported, so no network and no scipy)."""

from __future__ import annotations

import io
import struct
import zlib
from importlib.resources import files
from pathlib import Path

from PIL import Image


#: the photographs among scikit-image's files (not its drawings or test patterns): 20 real
#: scenes, colour and grey, 300 to 1411 pixels a side, JPEG and PNG
REAL_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
               "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
               "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
               "retina.jpg", "rocket.jpg", "text.png")


def photo_path(name: str) -> Path:
    """``rocket.jpg`` (640×427 JPEG), ``retina.jpg`` (1411×1411 JPEG),
    ``chelsea.png`` (451×300 RGB PNG), ``camera.png`` (512×512 grey PNG), ..."""
    return Path(str(files("skimage") / "data" / name))


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

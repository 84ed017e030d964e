"""Image bytes → the model's input, as the MLPerf reference prepares it.

MLPerf (``dataset.py: maybe_resize`` + ``pre_process_coco_resnet34``):
decode, RGB, the image as float32, stretch-resize to 1200×1200 with OpenCV
``INTER_LINEAR`` (no letterbox) on the floats, then ``(x/255 - mean)/std``
and HWC→CHW. :func:`to_input` does the same arithmetic but for rounding in
the last float bits (docs/model.md, "Preprocessing"), in the inference
actor (only the encoded files cross Ray's object store: stages.py).

It is arranged around the 17 MB float32 tensor the model reads, the one
costly thing to produce (benchmarks/preprocessing.py): each colour plane is
resized on its own straight into its plane of the [1, 3, 1200, 1200] input,
so the HWC→CHW reorder costs nothing at 1200² (OpenCV's bilinear filter
treats channels independently: the values are the interleaved resize's),
then scaled in place in one pass.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from batchdet.errors import one_line
from batchdet.model.spec import INPUT_SIZE, MEAN, STD
from batchdet.options import DEFAULT_MAX_PIXELS


def own_pixel_limit() -> None:
    """In a process batchdet owns (an inference actor): ``max_pixels`` alone
    bounds an image, so Pillow's process-wide bomb guard (a warning at 89 MP,
    an error at 179 MP) is switched off there. A library never changes it in
    its caller's process, where both limits apply and the lower one wins."""
    Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """One image cannot be used; ``str()`` is ``<ErrorKind>: <message>`` for the error column."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class Prepared:
    """What inference runs on: the model's input and the oriented original
    size that boxes are scaled back to."""

    tensor: np.ndarray  # float32 [1, 3, 1200, 1200], normalised RGB planes
    width: int
    height: int


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes → uint8 RGB [H, W, 3], EXIF orientation applied.

    The size is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. Animated images give their first frame.
    """
    if not data:
        raise ImageError("EmptyFile", "the file has 0 bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's guard, where it is on (see own_pixel_limit)
        raise ImageError("ImageTooLarge", _reason(e)) from None
    except Exception as e:  # Pillow raises UnidentifiedImageError, SyntaxError, ...
        raise ImageError("DecodeError", _reason(e)) from None
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(
            "ImageTooLarge", f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    try:
        ImageOps.exif_transpose(im, in_place=True)  # not a copy of every upright image
        return _to_rgb(im)
    except Exception as e:
        raise ImageError("DecodeError", _reason(e)) from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → uint8 RGB. Pillow's own ``convert("RGB")`` clips
    16- and 32-bit grey to 255 instead of scaling, so those are scaled here."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)  # 65535 → 255
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        grey = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "RGB":  # convert("RGB") would copy it once more
        return np.asarray(im, dtype=np.uint8)
    # RGBA/LA/PA: alpha dropped (as OpenCV's IMREAD_COLOR does); CMYK, YCbCr,
    # palette and 1-bit: Pillow's conversions.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _reason(e: Exception) -> str:
    return one_line(e, with_type=False)


#: (x - mean) / std as one multiply-add per channel, x * SCALE + SHIFT: one pass over each plane
_SCALE = [float(1 / STD[c]) for c in range(3)]
_SHIFT = [float(-MEAN[c] / STD[c]) for c in range(3)]


def to_input(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] → the model's float32 input [1, 3, 1200, 1200]:
    each channel as float32, stretched with OpenCV bilinear (MLPerf's own call
    on the floats, so no resized pixel is rounded to a grey level), then
    ``(x - mean) / std``, into ``out`` when given (an actor's reused buffer:
    no 17 MB faulted in per image)."""
    x = np.empty((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32) if out is None else out
    for c in range(3):
        plane = x[0, c]
        cv2.resize(rgb[:, :, c].astype(np.float32), (INPUT_SIZE, INPUT_SIZE), dst=plane,
                   interpolation=cv2.INTER_LINEAR)
        cv2.addWeighted(plane, _SCALE[c], plane, 0.0, _SHIFT[c], dst=plane)
    return x


def prepare(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, out: np.ndarray | None = None) -> Prepared:
    """Decode, orient, resize and normalise (into ``out`` when given)."""
    rgb = decode(data, max_pixels)
    height, width = rgb.shape[:2]
    return Prepared(to_input(rgb, out), width, height)


def preprocess(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Bytes → (model input, oriented width, oriented height)."""
    p = prepare(data, max_pixels)
    return p.tensor, p.width, p.height

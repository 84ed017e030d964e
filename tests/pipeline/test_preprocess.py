"""Preprocessing against an independent implementation of the MLPerf formula."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchdet.pipeline.preprocess import ImageError, decode, prepare, preprocess, to_input
from helpers.photos import encode, photo, png_declaring


def reference_bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV INTER_LINEAR written out: half-pixel centres, edge clamping,
    no antialiasing, in float64 (no rounding)."""
    in_h, in_w = src.shape[:2]

    def axis(n_out: int, n_in: int):
        s = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(s).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, s - lo

    y0, y1, fy = axis(out_h, in_h)
    x0, x1, fx = axis(out_w, in_w)
    s = src.astype(np.float64)
    fx = fx[None, :, None]
    top = s[y0][:, x0] * (1 - fx) + s[y0][:, x1] * fx
    bottom = s[y1][:, x0] * (1 - fx) + s[y1][:, x1] * fx
    return top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]


def reference_input(rgb: np.ndarray) -> np.ndarray:
    """MLPerf: resize, /255, - mean, / std (0-1 units), HWC→CHW, batch axis."""
    x = reference_bilinear(rgb, 1200, 1200) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return x.transpose(2, 0, 1)[None]


STD_255 = np.array([58.395, 57.12, 57.375])[None, :, None, None]


@pytest.mark.parametrize("name", ["rocket.jpg", "retina.jpg", "chelsea.png", "astronaut.png"])
def test_matches_mlperf_formula_on_real_photos(name):
    data = photo(name)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    x, width, height = preprocess(data)
    assert (width, height) == (rgb.shape[1], rgb.shape[0])
    assert x.dtype == np.float32 and x.shape == (1, 3, 1200, 1200)
    # the float64 formula, no resized pixel rounded: float32's last bits apart, in grey levels
    diff = np.abs(x - reference_input(rgb)) * STD_255
    assert diff.max() < FLOAT_GREY, diff.max()


#: how far (in grey levels of 255) float32 arithmetic may take a pixel from the
#: float64 formula; a resize of bytes would be up to 0.78 apart (preprocessing version 1)
FLOAT_GREY = 1e-4


def test_to_input_is_the_formula():
    rgb = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)  # no resize to do
    expected = (rgb / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    out = np.full((1, 3, 1200, 1200), np.nan, np.float32)
    assert to_input(rgb, out) is out
    np.testing.assert_allclose(out[0], expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_planar_resize_is_opencvs_interleaved_resize():
    import cv2

    rgb = np.asarray(Image.open(io.BytesIO(photo("astronaut.png"))).convert("RGB"))
    for h, w in [(rgb.shape[0], rgb.shape[1]), (300, 451), (2000, 1700)]:  # up- and downscaling
        src = np.ascontiguousarray(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA))
        interleaved = cv2.resize(src.astype(np.float32), (1200, 1200), interpolation=cv2.INTER_LINEAR)
        expected = (interleaved - np.float32([123.675, 116.28, 103.53])) / np.float32([58.395, 57.12, 57.375])
        np.testing.assert_allclose(to_input(src)[0], expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_exif_orientation_applied():
    rgb = np.asarray(Image.open(io.BytesIO(photo("rocket.jpg"))).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    data = encode(Image.fromarray(rgb), "PNG", exif=exif)
    out = decode(data)
    assert out.shape == (640, 427, 3)
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))
    p = prepare(data)
    assert (p.width, p.height) == (427, 640)


def test_greyscale_and_palette_and_alpha():
    grey = np.asarray(Image.open(io.BytesIO(photo("camera.png"))))
    assert grey.ndim == 2
    out = decode(photo("camera.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0  # fully transparent
    np.testing.assert_array_equal(decode(encode(Image.fromarray(rgba, "RGBA"), "PNG")), rgba[..., :3])

    la = Image.fromarray(np.stack([np.full((4, 4), 77, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (decode(encode(la, "PNG")) == 77).all()

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 1
    out = decode(encode(pal, "PNG", transparency=1))
    assert (out == [10, 200, 30]).all(axis=-1).all()


def test_cmyk_jpeg_colours():
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 0), (16, 0, 32, 16))  # white
    out = decode(encode(cmyk, "JPEG", quality=95)).astype(int)
    assert np.abs(out[:, :12] - [255, 0, 0]).max() <= 12
    assert np.abs(out[:, 20:] - [255, 255, 255]).max() <= 12


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    im = Image.new("I;16", (64, 64))
    im.frombytes(values.astype("<u2").tobytes())
    data = encode(im, "PNG")
    out = decode(data)
    expected = np.rint(values / 257.0)
    assert np.abs(out[:, :, 0] - expected).max() <= 1
    assert out.max() == 255 and out.min() == 0


def test_sixteen_bit_rgb_png():
    import cv2

    values = np.random.default_rng(1).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    ok, png = cv2.imencode(".png", values[:, :, ::-1])  # cv2 writes BGR
    assert ok
    out = decode(png.tobytes()).astype(int)
    assert np.abs(out - values / 257.0).max() <= 1


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "EmptyFile"),
        (b"<html><body>not an image</body></html>", "DecodeError"),
        (photo("rocket.jpg")[:5000], "DecodeError"),  # truncated JPEG
    ],
    ids=["empty", "html", "truncated"],
)
def test_bad_bytes_raise_one_clear_error(data, kind):
    with pytest.raises(ImageError) as e:
        prepare(data)
    assert e.value.kind == kind
    assert str(e.value).startswith(f"{kind}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("pillows_limit, says", [
    (Image.MAX_IMAGE_PIXELS, "10000000000 pixels"),  # a caller's process: Pillow's own guard refuses first
    (None, "10,000,000,000 pixels exceeds the limit of 100,000,000"),  # an actor's (own_pixel_limit)
])
def test_decompression_bomb_refused_before_decoding(monkeypatch, pillows_limit, says):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillows_limit)
    with pytest.raises(ImageError) as e:
        decode(png_declaring(100_000, 100_000))
    assert e.value.kind == "ImageTooLarge" and says in str(e.value)
    with pytest.raises(ImageError, match="ImageTooLarge"):
        decode(photo("chelsea.png"), max_pixels=1000)


def test_importing_and_decoding_leave_pillows_guard_alone():
    """A library leaves its caller's process as it found it: Pillow's
    process-wide bomb limit is the same after importing every stage and decoding."""
    import subprocess
    import sys

    code = ("import PIL.Image as I; before = I.MAX_IMAGE_PIXELS; "
            "import batchdet.api, batchdet.pipeline.stages; "
            "from batchdet.pipeline.preprocess import prepare; from helpers.photos import photo; "
            "prepare(photo('chelsea.png')); print(before, I.MAX_IMAGE_PIXELS)")
    tests = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": tests}).stdout.split()
    assert out[0] == out[1] != "None"


def test_extreme_aspect_and_single_pixel():
    for w, h in [(1, 1), (2000, 10)]:
        p = prepare(encode(Image.new("RGB", (w, h), (9, 99, 199)), "PNG"))
        assert p.tensor.shape == (1, 3, 1200, 1200) and (p.width, p.height) == (w, h)
        expected = (np.array([9, 99, 199]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        np.testing.assert_allclose(p.tensor[0].reshape(3, -1).T, np.broadcast_to(expected, (1200 * 1200, 3)),
                                   rtol=0, atol=1e-6)

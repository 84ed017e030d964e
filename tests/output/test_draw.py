"""``batchdet draw``: upright images, boxes in their class colour, a gallery that says what it did."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from batchdet.cli import main
from batchdet.output.draw import PALETTE, class_colour, draw, draw_boxes, relative_luminance, text_colour
from batchdet.storage import filesystem
from helpers.outputs import det, error_row, ok_row, output_url, write_output

GREY, GREEN, DARK = (128, 128, 128), (0, 200, 0), (40, 40, 40)


def _jpeg_rotated() -> bytes:
    """An 800x600 upright scene (green block top-left) stored as 600x800 with EXIF orientation 6."""
    upright = Image.new("RGB", (800, 600), GREY)
    upright.paste(GREEN, (0, 0, 120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 150), DARK).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(params=["local", "s3"])
def pictures(request: pytest.FixtureRequest, tmp_path):
    """(output URL, storage options, rows): two real images, an error row, a vanished file."""
    url, options = output_url(request, tmp_path)
    folder = url.rsplit("/", 1)[0] + "/pictures"
    fs, path = filesystem(folder, options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe(f"{path}/street.jpg", _jpeg_rotated())
    fs.pipe(f"{path}/room.png", _png())
    rows = [
        ok_row(f"{folder}/street.jpg", 800, 600, [det(1, 0.9, (300, 200, 600, 560)), det(3, 0.3, (20, 300, 200, 400))]),
        ok_row(f"{folder}/room.png", 200, 150, [det(18, 0.75, (30, 40, 170, 140)), det(1, 0.6, (5, 5, 60, 60))]),
        error_row(f"{folder}/broken.jpg", "UnidentifiedImageError: cannot identify image file"),
        ok_row(f"{folder}/vanished.jpg", 10, 10, []),
    ]
    write_output(url, {"pics": rows}, storage_options=options)
    return url, options, rows


def _close(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def test_draws_upright_images_with_class_colours(pictures, tmp_path) -> None:
    url, options, rows = pictures
    report = draw(url, "pics", tmp_path / "g", storage_options=options)
    assert [(d.uri, d.file, d.boxes, d.size) for d in report.drawn] == [
        (rows[1]["uri"], "0001-room.png", 2, (200, 150)),  # ordered by uri
        (rows[0]["uri"], "0002-street.jpg", 1, (800, 600)),
    ]
    room = Image.open(tmp_path / "g" / "0001-room.png").convert("RGB")
    assert room.size == (200, 150)
    assert room.getpixel((30, 90)) == class_colour(18)  # left edge of the dog box, lossless
    assert room.getpixel((26, 90)) == DARK

    street = Image.open(tmp_path / "g" / "0002-street.jpg").convert("RGB")
    assert street.size == (800, 600)  # upright, not the stored 600x800
    assert _close(street.getpixel((10, 70)), GREEN, 12)  # the block is top-left again: turned the right way
    assert _close(street.getpixel((301, 380)), class_colour(1), 40)  # person box edge (3 px line)
    assert _close(street.getpixel((21, 350)), GREY, 12)  # the car at 0.3 is below --min-score
    assert Image.open(tmp_path / "g" / "thumbs" / "0002-street.jpg").size == (320, 240)

    assert report.class_counts == {"person": 2, "dog": 1}
    assert report.skipped[0] == (rows[2]["uri"], "UnidentifiedImageError: cannot identify image file")
    assert report.skipped[1][0] == rows[3]["uri"] and report.skipped[1][1].startswith("cannot read: FileNotFoundError")


def test_gallery_lists_images_counts_and_skips(pictures, tmp_path) -> None:
    url, options, rows = pictures
    page = draw(url, "pics", tmp_path / "g", storage_options=options).index.read_text()
    assert "<h1>dataset pics</h1>" in page
    assert "2 of 4 images drawn · 2 skipped" in page
    assert '<a href="0001-room.png"><img src="thumbs/0001-room.png"' in page
    assert '<a href="0002-street.jpg"><img src="thumbs/0002-street.jpg"' in page
    assert "room.png · 2 boxes" in page and "street.jpg · 1 box<" in page
    assert f"background:rgb{class_colour(1)}\"></span>person</td><td>2</td>" in page
    assert "dog</td><td>1</td>" in page and "car</td>" not in page
    assert f"<td>{rows[2]['uri']}</td><td>UnidentifiedImageError: cannot identify image file</td>" in page
    assert f"<td>{rows[3]['uri']}</td><td>cannot read: FileNotFoundError" in page


def test_limit_and_min_score(tmp_path) -> None:
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(_png())
    (pics / "b.png").write_bytes(_png())
    rows = [ok_row(str(pics / n), 200, 150, [det(18, 0.75, (30, 40, 170, 140))]) for n in ("a.png", "b.png")]
    write_output(str(tmp_path / "out"), {"pics": rows})
    report = draw(str(tmp_path / "out"), "pics", tmp_path / "g", limit=1, min_score=0.8)
    assert ([d.file for d in report.drawn], report.not_drawn, report.class_counts) == (["0001-a.png"], 1, {})
    assert Image.open(tmp_path / "g" / "0001-a.png").getpixel((30, 90)) == DARK  # 0.75 < 0.8: not drawn
    assert "1 of 2 images drawn · 0 skipped · 1 not drawn (--limit)" in report.index.read_text()
    # a threshold equal to a stored float32 score keeps it (0.75 is exact, 0.9 is not)
    assert draw_boxes(Image.new("RGB", (50, 50)), [det(1, 0.9, (0, 0, 10, 10))], 0.9) == {"person": 1}


def test_image_changed_since_the_run_is_skipped(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    write_output(str(tmp_path / "out"), {"pics": [ok_row(str(tmp_path / "a.png"), 150, 200, [])]})
    report = draw(str(tmp_path / "out"), "pics", tmp_path / "g")
    assert report.drawn == []
    assert report.skipped == [(str(tmp_path / "a.png"),
                               "image is 200x150 now, the output row says 150x200 (changed since the run?)")]


def test_caption_stays_inside_the_image() -> None:
    """A box in the top-right corner: no room above, none to the right; the caption moves in."""
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    draw_boxes(image, [det(10, 0.99, (170, 0, 200, 30))], 0.5)
    colour = class_colour(10)
    assert image.getpixel((150, 3)) == colour  # caption fill, left of the box: shifted to fit
    assert image.getpixel((199, 25)) == colour  # right box edge
    assert image.getpixel((150, 40)) == (0, 0, 0)


def test_captions_of_one_place_do_not_cover_each_other() -> None:
    """Two classes on the same box: the more confident caption goes above, the other just inside."""
    image = Image.new("RGB", (300, 300), (0, 0, 0))
    draw_boxes(image, [det(3, 0.8, (100, 100, 200, 200)), det(1, 0.9, (100, 100, 200, 200))], 0.5)
    assert image.getpixel((101, 97)) == class_colour(1)  # person caption, above the box
    assert image.getpixel((101, 101)) == class_colour(3)  # car caption, inside it (on top of the box line)
    assert image.getpixel((101, 150)) == class_colour(1)  # box edges: the more confident box on top


def test_palette_is_distinct_and_captions_readable() -> None:
    """Every class has its own colour, and caption text on it meets WCAG AA contrast (4.5:1)."""
    assert len(PALETTE) == 91 and len(set(PALETTE[1:])) == 90
    for colour in PALETTE:
        lighter, darker = sorted([relative_luminance(colour), relative_luminance(text_colour(colour))], reverse=True)
        assert (lighter + 0.05) / (darker + 0.05) >= 4.5, colour


def test_cli(pictures, tmp_path, capsys) -> None:
    url, options, _ = pictures
    flags = [f for k, v in (options or {}).items() for f in ("--storage-option", f"{k}={v}")]
    assert main(["draw", url, "--dataset", "pics", "--to", str(tmp_path / "g"), "--limit", "5", *flags]) == 0
    assert capsys.readouterr().out == f"drew 2 images, skipped 2\nopen {Path(tmp_path / 'g' / 'index.html')}\n"
    assert main(["draw", url, "--dataset", "nope", "--to", str(tmp_path / "g"), *flags]) == 2
    assert capsys.readouterr().err == f"batchdet: error: no dataset 'nope' in {url} (datasets: pics)\n"

"""Look at the detections: boxes drawn on the images, and an HTML gallery of them.

Boxes are in pixels of the image *after* EXIF orientation (docs/output.md), so
every image is read from its ``uri`` and turned upright with
``ImageOps.exif_transpose`` before drawing; an image whose upright size no
longer matches its output row is skipped rather than drawn with wrong boxes.
"""

from __future__ import annotations

import colorsys
import html
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from batchdet.errors import one_line
from batchdet.model.labels import COCO_NAMES
from batchdet.output.query import open_output, read_dataset
from batchdet.output.schema import STATUS_OK
from batchdet.storage import filesystem

RGB = tuple[int, int, int]

#: Longest side of the gallery's thumbnails, in pixels.
THUMB_SIZE = 320


def _palette() -> tuple[RGB, ...]:
    """One colour per COCO id (0..90): golden-ratio hue steps, so neighbouring ids differ
    strongly, with alternating saturation and brightness as a second cue."""
    colours = []
    for i in range(max(COCO_NAMES) + 1):
        hue = (0.362 + i * 0.618033988749895) % 1.0  # 0.362: person (1) gets red, rare in skies and streets
        r, g, b = colorsys.hsv_to_rgb(hue, 1.0 if i % 2 else 0.7, 1.0 if i % 3 else 0.8)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)


#: Box colour by COCO category id.
PALETTE: tuple[RGB, ...] = _palette()


def class_colour(label_id: int) -> RGB:
    return PALETTE[label_id % len(PALETTE)]


def relative_luminance(colour: RGB) -> float:
    """WCAG 2 relative luminance (linearised sRGB), 0 for black to 1 for white."""
    r, g, b = (c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background: RGB) -> RGB:
    """Black or white, whichever contrasts more with ``background`` (WCAG contrast ratio).

    The two ratios are equal at luminance ≈ 0.179; every palette colour
    reaches at least 4.5:1 (WCAG AA) with the one chosen here.
    """
    return (0, 0, 0) if relative_luminance(background) > 0.179 else (255, 255, 255)


@dataclass
class DrawnImage:
    uri: str
    file: str  #: name inside the target directory
    thumb: str  #: thumbnail path relative to the target directory
    boxes: int
    size: tuple[int, int]


@dataclass
class DrawReport:
    output: str
    dataset: str
    to: Path
    min_score: float
    drawn: list[DrawnImage] = field(default_factory=list)
    #: (uri, reason): error rows and images that could not be drawn.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: ok rows left out because of ``limit``.
    not_drawn: int = 0
    #: boxes drawn per class label.
    class_counts: Counter = field(default_factory=Counter)

    @property
    def index(self) -> Path:
        return self.to / "index.html"


def draw(output: str, dataset: str, to: str | Path, limit: int | None = None, min_score: float = 0.5,
         storage_options: dict[str, Any] | None = None) -> DrawReport:
    """Draw boxes at ``score >= min_score`` on up to ``limit`` images of ``dataset`` into ``to``.

    Images are read from their ``uri`` (local or any fsspec URL, with the same
    storage options as the output). Writes one image per input (PNG for PNG
    sources, JPEG otherwise), ``thumbs/`` and ``index.html``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, not {limit}")
    if "://" in str(to):
        raise ValueError(f"--to must be a local directory, not {to} (the gallery is for a browser on this machine)")
    table = read_dataset(open_output(output, storage_options), dataset)
    uris, statuses, errors, widths, heights = (
        table.column(name).to_pylist() for name in ("uri", "status", "error", "width", "height"))
    detections = table.column("detections")  # turned into Python only for the images drawn
    report = DrawReport(output, dataset, Path(to), min_score)
    (report.to / "thumbs").mkdir(parents=True, exist_ok=True)
    for i, uri in enumerate(uris):
        if statuses[i] != STATUS_OK:
            report.skipped.append((uri, errors[i] or statuses[i]))
        elif limit is not None and len(report.drawn) >= limit:
            report.not_drawn += 1
        else:
            _draw_one(uri, (widths[i], heights[i]), detections[i].as_py(), report, storage_options)
    write_gallery(report)
    return report


def _draw_one(uri: str, size: tuple[int, int], detections: list[dict[str, Any]], report: DrawReport,
              storage_options: dict[str, Any] | None) -> None:
    try:
        image, source_format = _read_upright(uri, storage_options)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        report.skipped.append((uri, f"cannot read: {one_line(e)}"))
        return
    if image.size != size:
        report.skipped.append((uri, f"image is {image.width}x{image.height} now, the output row says "
                                    f"{size[0]}x{size[1]} (changed since the run?)"))
        return
    counts = draw_boxes(image, detections, report.min_score)
    report.class_counts.update(counts)
    ext = ".png" if source_format == "PNG" else ".jpg"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", posixpath.splitext(posixpath.basename(uri))[0])
    name = f"{len(report.drawn) + 1:04d}-{stem}{ext}"
    image.save(report.to / name, quality=90, subsampling=0)  # 4:4:4 keeps thin coloured lines crisp
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    thumb.save(report.to / "thumbs" / name, quality=85)
    report.drawn.append(DrawnImage(uri, name, f"thumbs/{name}", sum(counts.values()), image.size))


def _read_upright(uri: str, storage_options: dict[str, Any] | None) -> tuple[Image.Image, str | None]:
    """The image at ``uri`` in RGB, EXIF orientation applied, and its file format."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    source_format = image.format
    return ImageOps.exif_transpose(image).convert("RGB"), source_format


def draw_boxes(image: Image.Image, detections: list[dict[str, Any]], min_score: float) -> Counter:
    """Draw each detection at ``score >= min_score`` on ``image`` (in place); boxes drawn per label.

    Captions are placed most confident first, each where it covers no caption
    placed before it, so clustered boxes keep readable labels. Drawing goes
    the other way, least confident first, so the most confident box and
    caption end on top; all captions come after all boxes so no line crosses one.
    """
    threshold = float(np.float32(min_score))  # scores are float32: a stored 0.9 is 0.89999998
    shown = sorted((d for d in detections if d["score"] >= threshold), key=lambda d: -d["score"])
    pen = ImageDraw.Draw(image)
    short = min(image.size)
    line = max(2, round(short / 200))
    font = ImageFont.load_default(size=max(11, round(short / 32)))
    boxes = [_pixel_box(d, image.size) for d in shown]
    texts = [f"{d['label']} {d['score']:.2f}" for d in shown]
    places: list[tuple[int, int, int, int]] = []
    for text, box in zip(texts, boxes):
        places.append(_caption_place(pen.textbbox((0, 0), text, font=font), box, image.size, places))
    for d, box in zip(reversed(shown), reversed(boxes)):
        pen.rectangle(box, outline=class_colour(d["label_id"]), width=line)
    for d, text, place in zip(reversed(shown), reversed(texts), reversed(places)):
        colour = class_colour(d["label_id"])
        pen.rectangle(place, fill=colour)
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        pad = (place[2] - place[0] + 1 - (right - left)) // 2
        pen.text((place[0] + pad - left, place[1] + pad - top), text, fill=text_colour(colour), font=font)
    return Counter(d["label"] for d in shown)


def _pixel_box(d: dict[str, Any], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive pixel corners inside the image (Pillow draws the outline inwards from them)."""
    w, h = size
    x0 = min(max(round(d["x_min"]), 0), w - 1)
    y0 = min(max(round(d["y_min"]), 0), h - 1)
    x1 = min(max(round(d["x_max"]) - 1, x0), w - 1)
    y1 = min(max(round(d["y_max"]) - 1, y0), h - 1)
    return x0, y0, x1, y1


def _caption_place(text_box: tuple[int, int, int, int], box: tuple[int, int, int, int], size: tuple[int, int],
                   taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The caption's rectangle (text plus padding) for ``box``: inside the image, clear of ``taken`` if it can be.

    Tried in order: above the box's top-left corner, just inside it, below
    the box, inside its bottom; then stacked further above and further into
    the box. When all are taken, the first one: an overlap beats no label.
    """
    left, top, right, bottom = text_box
    pad = max(2, (bottom - top) // 5)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    x0, y0, _, y1 = box
    ys = [y0 - th, y0, y1 + 1, y1 - th + 1, *(y for k in (1, 2, 3) for y in (y0 - th * (k + 1), y0 + th * k))]
    x = max(0, min(x0, size[0] - tw))
    places = [(x, y, x + tw - 1, y + th - 1) for y in (max(0, min(y, size[1] - th)) for y in ys)]
    return next((p for p in places if not any(_overlap(p, t) for t in taken)), places[0])


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def write_gallery(report: DrawReport) -> Path:
    """``index.html`` in the target directory: counts, classes, thumbnails, skipped images."""
    e = html.escape
    total = len(report.drawn) + len(report.skipped) + report.not_drawn
    facts = [f"{len(report.drawn):,} of {total:,} images drawn", f"{len(report.skipped):,} skipped"]
    if report.not_drawn:
        facts.append(f"{report.not_drawn:,} not drawn (--limit)")
    label_ids = {name: i for i, name in COCO_NAMES.items()}
    class_rows = "".join(
        f'<tr><td><span class="sw" style="background:rgb{class_colour(label_ids.get(label, 0))}"></span>'
        f"{e(label)}</td><td>{n:,}</td></tr>"
        for label, n in sorted(report.class_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    figures = "".join(
        f'<figure><a href="{quote(d.file)}"><img src="{quote(d.thumb)}" loading="lazy" alt="{e(d.file)}"></a>'
        f"<figcaption>{e(posixpath.basename(d.uri))} · {d.boxes} box{'es' if d.boxes != 1 else ''}"
        f"</figcaption></figure>"
        for d in report.drawn)
    skipped = "".join(f"<tr><td>{e(uri)}</td><td>{e(reason)}</td></tr>" for uri, reason in report.skipped)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>batchdet · {e(report.dataset)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1rem; }}
td, th {{ padding: .2rem .8rem .2rem 0; text-align: left; vertical-align: top; }}
td:nth-child(2) {{ font-variant-numeric: tabular-nums; }}
.sw {{ display: inline-block; width: .9em; height: .9em; margin-right: .4em; border: 1px solid #555; }}
.grid {{ display: flex; flex-wrap: wrap; gap: .8rem; }}
figure {{ margin: 0; width: {THUMB_SIZE}px; }}
figure img {{ max-width: 100%; display: block; }}
figcaption {{ font-size: .85rem; overflow-wrap: anywhere; }}
</style></head><body>
<h1>dataset {e(report.dataset)}</h1>
<p>output {e(report.output)} · boxes at score &ge; {report.min_score:g} · {" · ".join(facts)}</p>
<h2>classes (boxes drawn)</h2>
<table><tr><th>class</th><th>boxes</th></tr>{class_rows or '<tr><td colspan="2">none</td></tr>'}</table>
<h2>images</h2>
<div class="grid">{figures or "<p>none</p>"}</div>
<h2>skipped ({len(report.skipped):,})</h2>
<table><tr><th>uri</th><th>reason</th></tr>{skipped or '<tr><td colspan="2">none</td></tr>'}</table>
</body></html>
"""
    report.index.write_text(page, encoding="utf-8")
    return report.index

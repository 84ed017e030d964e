"""``batchdet demo``: the whole job on a fresh machine, offline.

It draws a few pictures in two datasets (plus one broken file, to show that
a bad image becomes an error row), runs :func:`batchdet.api.detect` on them
locally with the official weights if they are in the cache and the stand-in
otherwise, and prints the summary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from batchdet.model.fetch import resolve_model_path
from batchdet.model.spec import STANDIN, ModelError, check_model

MARKER = ".batchdet-demo"
DATASETS = {"street": 5, "indoor": 4}


def synthesize(folder: Path, count: int, seed: int) -> None:
    """``count`` 640×480 JPEGs of sky, ground and coloured shapes, with sensor noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        y = np.linspace(0, 1, 480, dtype=np.float32)[:, None, None]
        sky = np.array([110, 160, 230], np.float32) * (1 - y) + np.array([200, 210, 220], np.float32) * y
        pixels = np.broadcast_to(sky, (480, 640, 3)).copy()
        pixels[300:] = rng.integers(60, 120, 3)
        im = Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(rng.integers(2, 6)):
            x0, y0 = rng.integers(0, 520), rng.integers(120, 400)
            w, h = rng.integers(40, 200), rng.integers(40, 160)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x0 + w, y0 + h], fill=colour, outline=(0, 0, 0), width=3)
        im.save(folder / f"{folder.name}-{i:02d}.jpg", quality=90)


def demo_model() -> tuple[Path, bool]:
    """(model path, official?): the official file when it is in place, else a
    full-size stand-in built once into the model cache (rebuilt if the file
    there is not a stand-in, so "not official" always means the stand-in)."""
    official = resolve_model_path(None)
    try:
        if check_model(official).official:
            return official, True
    except ModelError:
        pass
    standin = official.with_name("standin-ssd1200.onnx")
    if not _is_standin(standin):
        from batchdet.model.standin import write_standin

        print(f"building the stand-in model (random weights) at {standin} ...")
        write_standin(standin)
    return standin, False


def _is_standin(path: Path) -> bool:
    try:
        return path.exists() and check_model(path).kind_id == STANDIN
    except ModelError:
        return False


def prepare_demo(root: Path) -> dict[str, str]:
    """Fresh inputs under ``root/images`` and an empty ``root/output``; refuses
    to clear a folder that the demo did not make."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise ValueError(f"{root} exists and was not made by batchdet demo; pass another --output")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / MARKER).touch()
    datasets = {}
    for seed, (name, count) in enumerate(DATASETS.items()):
        synthesize(root / "images" / name, count, seed)
        datasets[name] = str(root / "images" / name)
    (root / "images" / "street" / "street-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return datasets

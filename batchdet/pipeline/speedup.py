"""What a run's engine and precision gain on this CPU: measured once, then remembered.

A run on OpenVINO (bf16 above all) times its model against onnxruntime on
the same file, in the driver, on the run's own first images, before any work:
two images, each run once untimed, then image by image alternately, twice
(about 15 s with the full model). The result is kept per model × engine and
version × precision × onnxruntime version × threads × CPU, so a machine pays
it once and the run's summary prints it the first time only (the manifest
records it every time). A claim in the docs is a number measured elsewhere;
this one is the user's own CPU.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from batchdet.files import atomic_write, cache_root
from batchdet.options import FP32, INT8, ONNXRUNTIME
from batchdet.pipeline.inference import cpu_fingerprint
from batchdet.pipeline.backend import make_backend
from batchdet.pipeline.precision import Choice
from batchdet.pipeline.preprocess import ImageError, prepare
from batchdet.pipeline.reading import read_many

SAMPLE_IMAGES = 2
ROUNDS = 2


@dataclass(frozen=True)
class Speedup:
    """Seconds per image of a run's engine and of onnxruntime on the same file, medians."""

    engine: str  # "openvino 2026.4.1 bf16"
    baseline: str  # "onnxruntime 1.32.0 fp32"
    s_per_image: float
    baseline_s_per_image: float
    images: int
    rounds: int
    threads: int
    measured: str  # when (ISO, UTC)

    @property
    def factor(self) -> float:
        """How many times faster than the baseline (below 1: slower)."""
        return self.baseline_s_per_image / self.s_per_image

    def to_text(self) -> str:
        return (f"measured on this CPU ({self.threads} threads, median of {self.images} images x {self.rounds} "
                f"rounds, interleaved): {self.engine} {self.s_per_image:.3f} s, {self.baseline} "
                f"{self.baseline_s_per_image:.3f} s per image: x{self.factor:.2f}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_interleaved(backends: Sequence[Any], images: Sequence[np.ndarray], rounds: int,
                     warm: bool = True) -> list[list[float]]:
    """Seconds of each ``predict`` of each loaded backend on ``images`` (model inputs):
    one untimed run each first (unless ``warm`` is False: the caller ran them), then
    image by image, the backends alternately, ``rounds`` times, so that every
    backend sees the same load."""
    if not images:
        raise ValueError("no image to time the models on")
    for backend in backends if warm else ():
        backend.predict(images[0])
    times: list[list[float]] = [[] for _ in backends]
    for _ in range(rounds):
        for image in images:
            for backend, spent in zip(backends, times):
                t = time.perf_counter()
                backend.predict(image)
                spent.append(time.perf_counter() - t)
    return times


def model_inputs(uris: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[np.ndarray]:
    """The images at ``uris`` as the pipeline feeds them to the model (float32
    [1, 3, 1200, 1200], 17 MB each: a few); unreadable or undecodable ones are left out."""
    inputs = []
    for data in read_many(list(uris), storage_options):
        if isinstance(data, ImageError):
            continue
        try:
            inputs.append(prepare(data).tensor)
        except ImageError:
            continue
    return inputs


def cache_path(model_sha256: str, engine: str, baseline: str, threads: int, cache_dir: Path | None = None) -> Path:
    """Where the measurement of one model × engine × baseline × threads × this CPU is kept."""
    key = f"{model_sha256[:24]}-{engine}-vs-{baseline}-t{threads}-cpu{cpu_fingerprint()}"
    key = re.sub(r"[^A-Za-z0-9._-]", "_", key)  # a version may hold "/" or spaces: one file name whatever it says
    return (cache_dir or cache_root() / "speedups") / f"{key}.json"


def _cached(path: Path) -> Speedup | None:
    try:
        return Speedup(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent, truncated or of another version: measure again
        return None


def measure_once(choice: Choice, model_path: str, model_sha256: str, uris: Sequence[str],
                 storage_options: dict[str, Any] | None = None, threads: int | None = None,
                 cache_dir: Path | None = None) -> tuple[Speedup | None, bool]:
    """``choice``'s speed against onnxruntime on ``model_path`` (its FP32, or an
    INT8 copy's INT8): (the measurement, whether it was made now). Made on the
    first :data:`SAMPLE_IMAGES` readable images of ``uris`` unless this CPU has
    it already; (None, False) when none of them is readable."""
    import onnxruntime

    threads = threads or os.cpu_count() or 1
    backend = make_backend(choice, model_path, threads, checked=True)
    baseline_choice = Choice(ONNXRUNTIME, INT8 if choice.precision == INT8 else FP32)
    engine = f"{backend.name} {backend.version} {choice.precision}"
    baseline = f"{ONNXRUNTIME} {onnxruntime.__version__} {baseline_choice.precision}"
    path = cache_path(model_sha256, engine, baseline, threads, cache_dir)
    known = _cached(path)
    if known is not None:
        return known, False
    images = model_inputs(uris[:SAMPLE_IMAGES * 2], storage_options)[:SAMPLE_IMAGES]
    if not images:
        return None, False
    mine, theirs = map(statistics.median, time_interleaved(
        [backend.load(), make_backend(baseline_choice, model_path, threads, checked=True).load()], images, ROUNDS))
    result = Speedup(engine, baseline, mine, theirs, len(images), ROUNDS, threads,
                     datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as file:
            file.write(json.dumps(result.to_dict()).encode())
    except OSError:  # a read-only cache: measured again next time, never an error
        pass
    return result, True

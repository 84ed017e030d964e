"""Single-process detection: the model and its post-processing, which the
Ray actors run through :meth:`Detector.select` and users through
:meth:`Detector.detect` (the reference the pipeline's output is tested against)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from batchdet.model.fetch import resolve_model_path
from batchdet.model.spec import INPUT_SIZE, NMS_SCORE_THRESHOLD
from batchdet.options import DEFAULT_MAX_PIXELS
from batchdet.pipeline.backend import make_backend
from batchdet.pipeline.precision import DEFAULT_CHOICE, Choice
from batchdet.pipeline.postprocess import as_dicts, select
from batchdet.pipeline.preprocess import prepare


@dataclass(frozen=True)
class ImageDetections:
    """Detections of one image, in pixels of the oriented original."""

    width: int
    height: int
    detections: list[dict] = field(default_factory=list)


class Detector:
    """Load a conforming model once, then detect image after image.

    >>> det = Detector("resnet34-ssd1200.onnx")            # doctest: +SKIP
    >>> det.detect(open("cat.jpg", "rb").read()).detections[0]["label"]  # doctest: +SKIP
    'cat'
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        threads: int | None = None,
        gpus: float = 0.0,
        score_threshold: float = NMS_SCORE_THRESHOLD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        checked: bool = False,
        choice: Choice = DEFAULT_CHOICE,
    ):
        """``checked``: see :class:`batchdet.pipeline.inference.OnnxBackend`; ``choice``: the
        engine and precision (:func:`batchdet.pipeline.precision.choose` made it and checked it)."""
        self.backend = make_backend(choice, resolve_model_path(model_path), threads, gpus, checked=checked).load()
        self.score_threshold = score_threshold
        self.max_pixels = max_pixels
        self._input: np.ndarray | None = None  # detect()'s model input, reused image after image

    def detect(self, data: bytes) -> ImageDetections:
        """Encoded image bytes → detections; raises ``ImageError`` for a bad image."""
        if self._input is None:
            self._input = np.empty((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
        p = prepare(data, self.max_pixels, out=self._input)
        return self.detect_prepared(p.tensor, p.width, p.height)

    def detect_prepared(self, x: np.ndarray, width: int, height: int) -> ImageDetections:
        """The model's float input [1, 3, 1200, 1200] (:func:`batchdet.pipeline.preprocess.prepare`'s)
        and the original size → detections."""
        return ImageDetections(width, height, as_dicts(*self.select(x, width, height)))

    def select(self, x: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model on one prepared input → :func:`batchdet.pipeline.postprocess.select`'s
        arrays: what the Ray actors turn into output columns, and :meth:`detect_prepared` into dicts."""
        raw = self.backend.predict(x)
        return select(raw.bboxes, raw.labels, raw.scores, width, height, self.score_threshold)

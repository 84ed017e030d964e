"""MLPerf's reference path for SSD-ResNet34 1200x1200 ONNX, in one process, written
from its published code (mlcommons/inference, ``vision/classification_and_detection/python/``)
and importing nothing of batchdet: what batchdet's output is checked against
(tests/test_fidelity.py, benchmarks/fidelity.py).

What it follows, step by step (profile ``ssd-resnet34-onnxruntime``: dataset
``coco-1200-onnx``, NCHW, run with ``--use-inv-map``):

- ``coco.Coco``: the image is read with ``cv2.imread`` (8-bit BGR, greyscale
  made 3-channel); its original size is what the annotations record, the
  decoded image's.
- ``dataset.maybe_resize`` + ``pre_process_coco_resnet34``: to float32
  *before* resizing, BGR->RGB, ``cv2.resize`` to 1200x1200 ``INTER_LINEAR`` on
  the floats (no rounding to bytes), ``/ 255.``, minus
  the mean, divided by the std (float32), HWC->CHW, a batch of one.
- onnxruntime on the model's outputs ``bboxes``, ``labels``, ``scores``.
- ``coco.PostProcessCocoOnnx``: detections in the model's order until the
  first score below 0.5; a box is ``x_min, y_min, x_max, y_max`` normalised
  (its code swaps the pairs on the way in and back in ``finalize``); ``finalize``
  multiplies x by the width and y by the height, with **no clipping**, and
  ``use_inv_map`` turns the class index 1..80 into the COCO category id of the
  annotation file's categories in order. (Later MLPerf versions run this
  profile through ``PostProcessCocoPt(True, 0.05)``: the same maths at a 0.05
  threshold; ``score_threshold`` takes either.)
"""

from __future__ import annotations

import functools
from os import PathLike

import cv2
import numpy as np
import onnxruntime as ort

#: the 80 COCO 2017 category ids in the annotation file's order (``cocoGt.getCatIds()``):
#: ``use_inv_map`` maps model class index i (1..80) to the i-th of them
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91))
INV_MAP: dict[int, int] = {index: cat_id for index, cat_id in enumerate(COCO_CATEGORY_IDS, start=1)}

SIZE = 1200
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
#: PostProcessCocoOnnx stops at the first detection scoring below this
SCORE_THRESHOLD = 0.5


def read_image(path: str | PathLike) -> np.ndarray:
    """``cv2.imread``'s uint8 BGR [H, W, 3], as ``coco.Coco`` reads an image."""
    img = cv2.imread(str(path))
    if img is None:
        raise ValueError(f"cv2.imread cannot read {path}")
    return img


def pre_process(img: np.ndarray) -> np.ndarray:
    """``pre_process_coco_resnet34(img, dims=[1200, 1200, 3], need_transpose=True)``,
    batched: uint8 BGR [H, W, 3] -> float32 [1, 3, 1200, 1200]."""
    img = np.array(img, dtype=np.float32)
    if img.ndim < 3 or img.shape[2] != 3:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    img = img / 255. - MEAN
    img = img / STD
    return img.transpose([2, 0, 1])[None]


def post_process(bboxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, width: int, height: int,
                 score_threshold: float = SCORE_THRESHOLD) -> list[dict]:
    """One image's model outputs (batch axis removed) -> ``PostProcessCocoOnnx`` +
    ``finalize`` with ``use_inv_map``: dicts of ``label_id`` (COCO id; -1 for an
    index the map lacks, as MLPerf's), ``score`` and the box in pixels of the
    original, unclipped."""
    found = []
    for box, label, score in zip(bboxes, labels, scores):
        if score < score_threshold:
            break
        found.append({"label_id": INV_MAP.get(int(label), -1), "score": float(score),
                      "x_min": float(box[0]) * width, "y_min": float(box[1]) * height,
                      "x_max": float(box[2]) * width, "y_max": float(box[3]) * height})
    return found


@functools.lru_cache(maxsize=4)
def session(model_path: str) -> ort.InferenceSession:
    """One onnxruntime session per model file (default options, CPU), as MLPerf's backend makes it."""
    return ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])


def reference_detections(model_path: str | PathLike, image_path: str | PathLike,
                         score_threshold: float = SCORE_THRESHOLD) -> list[dict]:
    """MLPerf's detections of one image file: read, pre-process, run,
    post-process (see the module's docstring). Boxes are in pixels of the file's decoded size, unclipped."""
    img = read_image(image_path)
    height, width = img.shape[:2]
    bboxes, labels, scores = session(str(model_path)).run(["bboxes", "labels", "scores"],
                                                          {"image": pre_process(img)})
    return post_process(bboxes[0], labels[0], scores[0], width, height, score_threshold)

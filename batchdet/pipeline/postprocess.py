"""Model outputs → detections in the contract's terms.

The graph already decoded, ran NMS and sorted; what is left is the mapping to
what users want: pixels of the oriented original image (the stretch-resize
means normalised x scales by width and y by height), clipped to it, COCO
category ids and names, and the user's score threshold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from batchdet.model.labels import INDEX_TO_COCO_ID, INDEX_TO_NAME, NUM_CLASSES
from batchdet.model.spec import NMS_SCORE_THRESHOLD
from batchdet.output.schema import DETECTION_TYPE

_NAMES = pa.array(INDEX_TO_NAME, pa.string())


def to_detections(
    bboxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    score_threshold: float = NMS_SCORE_THRESHOLD,
) -> list[dict]:
    """One image's raw outputs (``[N,4]``, ``[N]``, ``[N]``, batch axis removed)
    → detection dicts sorted by score, high first (:func:`select`, as dicts).
    """
    return as_dicts(*select(bboxes, labels, scores, width, height, score_threshold))


def as_dicts(pixels: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> list[dict]:
    """:func:`select`'s arrays → one dict per detection, in the contract's terms."""
    return [
        {
            "label_id": int(INDEX_TO_COCO_ID[c]),
            "label": INDEX_TO_NAME[c],
            "score": float(s),
            "x_min": float(b[0]),
            "y_min": float(b[1]),
            "x_max": float(b[2]),
            "y_max": float(b[3]),
        }
        for c, s, b in zip(labels.tolist(), scores.tolist(), pixels)
    ]


def detections_column(selected: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]) -> pa.ListArray:
    """The ``detections`` column of a block of images, built from arrays.

    ``selected[i]`` is image i's :func:`select` result, or None for an error
    row (null in the column). The values go straight from numpy into Arrow
    buffers, with no Python object per detection: per-row dicts cost a
    visible share of a CPU at hundreds of images a second
    (docs/notes/2026-12-02-fast-models.md).
    """
    parts = [p for p in selected if p is not None]
    boxes = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 4), np.float32)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    scores = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    struct = pa.StructArray.from_arrays(
        [pa.array(INDEX_TO_COCO_ID[labels]), _NAMES.take(pa.array(labels)), pa.array(scores),
         *(pa.array(np.ascontiguousarray(boxes[:, k])) for k in range(4))],
        fields=list(DETECTION_TYPE),
    )
    lengths = [0 if p is None else len(p[2]) for p in selected]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    mask = pa.array([p is None for p in selected], pa.bool_())
    return pa.ListArray.from_arrays(offsets, struct, type=pa.list_(DETECTION_TYPE), mask=mask)


def select(bboxes, labels, scores, width: int, height: int, score_threshold: float = NMS_SCORE_THRESHOLD):
    """One image's raw outputs → its detections above the threshold, sorted
    by score (high first, stable), in clipped pixels of the original:
    (boxes float32 [K, 4], class indices int64 [K], scores float32 [K]).

    Raises ValueError when the model emits a class index outside 1..80: such a
    file does not meet the contract and its labels cannot be trusted.
    """
    bboxes = np.asarray(bboxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    bad = labels[(labels < 1) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise ValueError(f"model emitted class index {int(bad[0])}, outside 1..{NUM_CLASSES - 1}")
    keep = scores >= score_threshold
    order = np.argsort(-scores[keep], kind="stable")
    size = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(bboxes[keep][order] * size, 0, size), labels[keep][order], scores[keep][order]


#: COCO category id → model class index: :data:`INDEX_TO_COCO_ID` inverted.
_COCO_ID_TO_INDEX = np.zeros(int(INDEX_TO_COCO_ID.max()) + 1, np.int64)
_COCO_ID_TO_INDEX[INDEX_TO_COCO_ID] = np.arange(NUM_CLASSES)


def selected_from(detections: pa.ListScalar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored row's ``detections`` back as :func:`select`'s arrays, so a copied
    row is built by :func:`detections_column` exactly as a computed one."""
    values = detections.values
    if values is None or len(values) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    column = {name: values.field(name).to_numpy(zero_copy_only=False) for name in DETECTION_TYPE.names}
    boxes = np.stack([column[k] for k in ("x_min", "y_min", "x_max", "y_max")], axis=1).astype(np.float32)
    return boxes, _COCO_ID_TO_INDEX[column["label_id"]], column["score"].astype(np.float32)

"""Model outputs → detections in the contract's terms.

The graph already decoded, ran NMS and sorted; what is left is the mapping to
what users want: pixels of the oriented original image (the stretch-resize
means normalised x scales by width and y by height), clipped to it, COCO
category ids and names, and the user's score threshold.
"""

from __future__ import annotations

import numpy as np

from batchdet.labels import INDEX_TO_COCO_ID, INDEX_TO_NAME, NUM_CLASSES
from batchdet.spec import NMS_SCORE_THRESHOLD


def to_detections(
    bboxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    score_threshold: float = NMS_SCORE_THRESHOLD,
) -> list[dict]:
    """One image's raw outputs (``[N,4]``, ``[N]``, ``[N]``, batch axis removed)
    → detection dicts sorted by score, high first.

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
    bboxes, labels, scores = bboxes[keep], labels[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    size = np.array([width, height, width, height], dtype=np.float32)
    pixels = np.clip(bboxes[order] * size, 0, size)
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
        for c, s, b in zip(labels[order].tolist(), scores[order].tolist(), pixels)
    ]

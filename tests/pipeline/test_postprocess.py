"""Raw outputs → contract detections: pixels, clipping, label map, threshold, order."""

from __future__ import annotations

import numpy as np
import pytest

from batchdet.pipeline.postprocess import to_detections


def test_pixels_clipping_labels_threshold_and_order():
    bboxes = np.array(
        [
            [0.1, 0.2, 0.5, 0.6],  # inside
            [-0.05, 0.9, 0.25, 1.1],  # strays outside: clipped
            [0.0, 0.0, 1.0, 1.0],  # below threshold
            [0.5, 0.5, 0.75, 1.0],
        ],
        np.float32,
    )
    labels = np.array([1, 12, 3, 80])  # person, stop sign (COCO 13), car, toothbrush (COCO 90)
    scores = np.array([0.3, 0.6, 0.04, 0.9], np.float32)
    dets = to_detections(bboxes, labels, scores, width=640, height=480)
    assert [d["label_id"] for d in dets] == [90, 13, 1]
    assert [d["label"] for d in dets] == ["toothbrush", "stop sign", "person"]
    assert [round(d["score"], 6) for d in dets] == [0.9, 0.6, 0.3]
    boxes = [[d["x_min"], d["y_min"], d["x_max"], d["y_max"]] for d in dets]
    np.testing.assert_allclose(boxes, [[320, 240, 480, 480], [0, 432, 160, 480], [64, 96, 320, 288]], atol=1e-3)


def test_user_threshold_and_empty():
    bboxes = np.zeros((2, 4), np.float32)
    assert to_detections(bboxes, np.array([1, 2]), np.array([0.5, 0.7], np.float32), 10, 10, 0.6)[0]["score"] == pytest.approx(0.7)
    assert to_detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 10, 10) == []


@pytest.mark.parametrize("bad", [0, 81])
def test_label_outside_contract_is_refused(bad):
    with pytest.raises(ValueError, match=f"class index {bad}"):
        to_detections(np.zeros((1, 4)), np.array([bad]), np.array([0.9]), 10, 10)

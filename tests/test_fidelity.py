"""batchdet against MLPerf's own maths (tests/helpers/mlperf_reference.py, written
from mlcommons/inference with nothing of batchdet), quick: a handful of photos,
narrow stand-ins. benchmarks/fidelity.py is the same comparison at full size.

Link by link, so a failure names its link: the preprocessed tensor (within a
grey level: MLPerf resizes floats, batchdet bytes), the label map (equal),
``detect``'s rows against MLPerf's post-processing of the very tensor batchdet
ran (equal), then the whole path on the smooth stand-in (issue 25's measure).
"""

from __future__ import annotations

import numpy as np
import pytest

from batchdet.api import detect
from batchdet.model.labels import COCO_NAMES, INDEX_TO_COCO_ID
from batchdet.model.standin import write_standin
from batchdet.pipeline.preprocess import preprocess
from helpers import mlperf_reference as mlperf
from helpers.benchmarks import script
from helpers.photos import photo_path

fidelity = script("fidelity")
#: a colour PNG, a grey PNG, a JPEG, a small non-square PNG
PHOTOS = ("astronaut.png", "camera.png", "rocket.jpg", "coins.png")
NMS_THRESHOLD = 0.05  # detect's default --score-threshold: every detection the graph emits


def _detect(model, photos: tuple[str, ...], tmp_path) -> dict[str, dict]:
    """``detect`` in-process over ``photos`` (linked into one folder); its rows by file name."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in photos:
        (folder / name).symlink_to(photo_path(name))
    detect({"photos": str(folder)}, str(tmp_path / "out"), model=str(model), execution="in-process")
    rows = fidelity.batchdet_rows(tmp_path / "out")
    assert sorted(rows) == sorted(photos) and all(r["status"] == "ok" for r in rows.values())
    return rows


def test_label_map_is_batchdets():
    assert mlperf.COCO_CATEGORY_IDS == tuple(sorted(COCO_NAMES)) and len(mlperf.INV_MAP) == 80
    assert [mlperf.INV_MAP[i] for i in range(1, 81)] == INDEX_TO_COCO_ID[1:].tolist()


@pytest.mark.parametrize("name", PHOTOS)
def test_preprocessed_tensor_is_within_a_grey_level_of_batchdets(name):
    """MLPerf resizes the image as floats, batchdet as bytes (rounded): their
    inputs differ by under one grey level (0..255), nowhere more."""
    ours, width, height = preprocess(photo_path(name).read_bytes())
    img = mlperf.read_image(photo_path(name))
    theirs = mlperf.pre_process(img)
    assert theirs.shape == ours.shape == (1, 3, 1200, 1200) and theirs.dtype == np.float32
    assert (width, height) == (img.shape[1], img.shape[0])
    grey = np.abs(theirs - ours) * mlperf.STD[None, :, None, None] * 255
    assert grey.max() <= 1.0


def test_detect_rows_are_mlperfs_post_processing_of_the_same_tensor(tmp_path):
    """The random narrow stand-in run on batchdet's own input tensor, its raw
    outputs through MLPerf's post-processing (at detect's 0.05, clipped): every
    detection of ``detect``'s Parquet rows, the same label, box and score."""
    model = write_standin(tmp_path / "random.onnx", channels_divisor=16)
    rows = _detect(model, PHOTOS[:3], tmp_path)
    for name in PHOTOS[:3]:
        x, width, height = preprocess(photo_path(name).read_bytes())
        bboxes, labels, scores = mlperf.session(str(model)).run(["bboxes", "labels", "scores"], {"image": x})
        theirs = mlperf.post_process(bboxes[0], labels[0], scores[0], width, height, NMS_THRESHOLD)
        ours = rows[name]["detections"]
        m = fidelity.match_image(name, theirs, ours, width, height, box_px=1e-3, score_diff=1e-6)
        assert len(theirs) == len(ours) > 0 and m["found"] == len(theirs), m["unmatched"][:3]


def test_detect_finds_mlperfs_detections_on_the_smooth_stand_in(smooth_model, tmp_path):
    """Issue 25's measure, end to end, on the narrow smooth stand-in: of
    MLPerf's detections (score >= 0.5) on real photos, those ``detect`` finds
    with the same label, every edge within 1 px and the score within 1e-3.
    All of them when the reference resizes bytes as batchdet does (everything
    else is MLPerf's own code). With MLPerf's float resize, the rounding (up
    to 0.78 grey level) moves most scores by more than 1e-3 (docs/notes/
    2026-12-04-fidelity.md) but keeps >= 95 % of labels and boxes within
    2 px, as noise of that size does on this model."""
    rows = _detect(smooth_model, PHOTOS, tmp_path)
    by_way = {}
    for resize_bytes in (True, False):
        matches = []
        for name in PHOTOS:
            height, width = mlperf.read_image(photo_path(name)).shape[:2]
            reference = mlperf.reference_detections(smooth_model, photo_path(name), resize_bytes=resize_bytes)
            matches.append(fidelity.match_image(name, reference, rows[name]["detections"], width, height))
        by_way[resize_bytes] = fidelity.summarise(matches)
    as_bytes, as_floats = by_way[True], by_way[False]
    assert as_bytes["reference_detections"] > 50 and as_bytes["agreement"] == 1.0, fidelity.rows(as_bytes)[:12]
    assert as_bytes["max_score_diff"] < 1e-4 and as_bytes["max_box_diff_px"] < 0.01
    # the float resize: found by label and box within 2 px, whatever the score
    loose = [fidelity.match_image(name, mlperf.reference_detections(smooth_model, photo_path(name)),
                                  rows[name]["detections"], *mlperf.read_image(photo_path(name)).shape[1::-1],
                                  box_px=2.0, score_diff=1.0) for name in PHOTOS]
    assert fidelity.summarise(loose)["agreement"] >= 0.95
    assert as_floats["agreement"] < 0.99  # the rounding's cost: the day it is gone, this test says so

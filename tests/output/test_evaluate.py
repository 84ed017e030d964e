"""``batchdet eval``: AP on ground truth whose answer is known, checked against pycocotools directly."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from batchdet.cli import main
from batchdet.output.evaluate import METRICS, evaluate
from batchdet.storage import filesystem
from helpers.outputs import det, error_row, f32, ok_row, output_url, write_output

# COCO sizes: small < 32², medium < 96², large above; every range has objects.
GT_BOXES = {  # image id -> [(category id, [x, y, w, h])]
    101: [(1, [10, 20, 200, 300]), (3, [300, 200, 60, 50]), (18, [500, 400, 20, 25])],
    102: [(1, [100, 100, 40, 80]), (3, [200, 150, 300, 200]), (3, [50, 50, 25, 20])],
    103: [(18, [10, 10, 300, 200])],
    104: [(3, [5, 5, 50, 50])],
}
FILE_NAMES = {101: "000000000101.jpg", 102: "000000000102.jpg", 103: "000000000103.jpg", 104: "000000000104.jpg"}


def ground_truth() -> dict[str, Any]:
    annotations = [
        {"id": n, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for n, (image, cat, box) in enumerate(
            ((image, cat, box) for image, anns in GT_BOXES.items() for cat, box in anns), start=1)
    ]
    return {
        "images": [{"id": i, "file_name": name, "width": 640, "height": 480} for i, name in FILE_NAMES.items()],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
        "annotations": annotations,
    }


def detections_for(image: int, shift: tuple[float, float] = (0, 0), grow: float = 1.0,
                   score: float = 1.0, step: float = 0.0) -> list[dict[str, Any]]:
    """The ground truth of ``image`` as detections (xyxy), moved by ``shift`` and widened by ``grow``;
    the k-th scores ``score - k * step``."""
    return [det(cat, score - step * k, (x + shift[0], y + shift[1], x + shift[0] + w * grow, y + shift[1] + h))
            for k, (cat, (x, y, w, h)) in enumerate(GT_BOXES[image])]


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path):
    """(output URL, annotations URL, storage options): both local, or both in a moto bucket."""
    url, options = output_url(request, tmp_path)
    annotations = url.rsplit("/", 1)[0] + "/instances.json"
    fs, path = filesystem(annotations, options)
    fs.pipe(path, json.dumps(ground_truth()).encode())
    return url, annotations, options


def pycocotools_directly(annotations_json: dict[str, Any], rows: list[dict[str, Any]],
                         image_ids: list[int]) -> list[float]:
    """COCOeval on the same boxes as plain result dicts: the answer, computed without batchdet."""
    gt = COCO()
    gt.dataset = annotations_json
    ids = {name: i for i, name in FILE_NAMES.items()}
    results = [
        {"image_id": ids[row["uri"].rsplit("/", 1)[-1]], "category_id": d["label_id"], "score": f32(d["score"]),
         "bbox": [f32(d["x_min"]), f32(d["y_min"]), f32(d["x_max"]) - f32(d["x_min"]),
                  f32(d["y_max"]) - f32(d["y_min"])]}
        for row in rows for d in row["detections"] or []
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


def test_detections_equal_to_ground_truth_score_ap_1(place) -> None:
    url, annotations, options = place
    rows = [ok_row(f"{url}-images/val/{FILE_NAMES[i]}", 640, 480, detections_for(i)) for i in (101, 102)]
    write_output(url, {"coco": rows}, storage_options=options)
    result = evaluate(url, annotations, "coco", options)
    for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR10", "AR100",
                "AR_small", "AR_medium", "AR_large"):
        assert result.stats[key] == pytest.approx(1.0, abs=1e-12), key
    # one detection per image and class: image 102 has two cars, so car recall is 2/3
    assert result.stats["AR1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert (result.images_evaluated, result.detections_evaluated) == (2, 6)
    assert result.missing_output == [FILE_NAMES[103], FILE_NAMES[104]]


def test_shifted_boxes_give_what_pycocotools_gives(place) -> None:
    url, annotations, options = place
    rows = [
        ok_row(f"/photos/{FILE_NAMES[101]}", 640, 480,
               detections_for(101, shift=(4, -3), grow=1.1, score=0.9, step=0.1)),
        ok_row(f"/photos/{FILE_NAMES[102]}", 640, 480, [
            *detections_for(102, shift=(-6, 5), score=0.8, step=0.2),
            det(1, 0.3, (400, 10, 480, 200)),  # a false positive
        ]),
        error_row(f"/photos/{FILE_NAMES[103]}", "OSError: truncated"),
    ]
    write_output(url, {"coco": rows}, storage_options=options)
    result = evaluate(url, annotations, "coco", options)
    expected = pycocotools_directly(ground_truth(), rows, [101, 102, 103])
    assert [result.stats[key] for key, _ in METRICS] == expected
    assert 0 < result.stats["AP"] < 1  # the shift matters, so the comparison means something
    assert result.error_images == [f"/photos/{FILE_NAMES[103]}"]


def test_error_rows_count_as_images_without_detections(tmp_path) -> None:
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(ground_truth()))
    rows = [ok_row(f"/p/{FILE_NAMES[i]}", 640, 480, detections_for(i)) for i in (101, 102)]
    write_output(str(tmp_path / "out"), {"coco": [*rows, error_row(f"/p/{FILE_NAMES[103]}", "OSError: gone")]})
    result = evaluate(str(tmp_path / "out"), str(annotations), "coco")
    # the dog of image 103 is missed: recall of dog is 1/2 at every IoU, so AR100 = (1 + 1 + 0.5) / 3
    assert result.stats["AR100"] == pytest.approx(2.5 / 3)
    assert result.stats["AR100"] == pytest.approx(pycocotools_directly(ground_truth(), rows, [101, 102, 103])[8])


def test_unmatched_images_are_reported(tmp_path) -> None:
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(ground_truth()))
    rows = [
        ok_row(f"/p/{FILE_NAMES[101]}", 640, 480, detections_for(101)),
        ok_row("/p/holiday.jpg", 640, 480, detections_for(102)),
        error_row(f"/q/{FILE_NAMES[101]}", "OSError: a copy that failed"),
    ]
    write_output(str(tmp_path / "out"), {"coco": rows})
    result = evaluate(str(tmp_path / "out"), str(annotations), "coco")
    assert result.missing_output == [FILE_NAMES[102], FILE_NAMES[103], FILE_NAMES[104]]
    assert result.unannotated == ["/p/holiday.jpg"]
    assert result.duplicates == [f"/q/{FILE_NAMES[101]}"]  # the ok row of the same name is the one evaluated
    assert (result.images_evaluated, result.error_images) == (1, [])
    assert result.stats["AP"] == pytest.approx(1.0, abs=1e-12)


def test_no_detections_at_all_is_ap_0(tmp_path) -> None:
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(ground_truth()))
    write_output(str(tmp_path / "out"), {"coco": [ok_row(f"/p/{FILE_NAMES[101]}", 640, 480, [])]})
    result = evaluate(str(tmp_path / "out"), str(annotations), "coco")
    assert result.stats["AP"] == 0.0 and result.stats["AR100"] == 0.0
    assert result.detections_evaluated == 0


def test_nothing_matches_is_a_clear_error(tmp_path) -> None:
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(ground_truth()))
    write_output(str(tmp_path / "out"), {"coco": [ok_row("/p/cat.jpg", 640, 480, [])]})
    with pytest.raises(ValueError, match="none of the 1 images of dataset 'coco' has a file name listed in"):
        evaluate(str(tmp_path / "out"), str(annotations), "coco")
    with pytest.raises(ValueError, match=r"no dataset 'val' in .* \(datasets: coco\)"):
        evaluate(str(tmp_path / "out"), str(annotations), "val")
    (tmp_path / "labels.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a COCO instances file"):
        evaluate(str(tmp_path / "out"), str(tmp_path / "labels.json"), "coco")


def test_cli_prints_pycocotools_lines_and_writes_json(place, tmp_path, capsys, monkeypatch) -> None:
    url, annotations, options = place
    rows = [ok_row(f"/p/{FILE_NAMES[i]}", 640, 480, detections_for(i)) for i in (101, 102)]
    rows.append(error_row(f"/p/{FILE_NAMES[103]}", "OSError: gone"))
    write_output(url, {"coco": rows}, storage_options=options)
    flags = [f for k, v in (options or {}).items() for f in ("--storage-option", f"{k}={v}")]
    monkeypatch.chdir(tmp_path)
    assert main(["eval", url, "--annotations", annotations, "--dataset", "coco", *flags]) == 0
    out = capsys.readouterr().out
    expected = pycocotools_directly(ground_truth(), rows, [101, 102, 103])
    assert f" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {expected[0]:0.3f}" in out
    assert f" Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = {expected[11]:0.3f}" in out
    assert f"1 matched images had status 'error'; evaluated as images with no detections: /p/{FILE_NAMES[103]}" in out
    assert f"1 annotated images have no output row; not evaluated: {FILE_NAMES[104]}" in out
    saved = json.loads((tmp_path / "eval-coco.json").read_text())
    assert list(saved["stats"].values()) == expected
    assert saved["missing_output"] == [FILE_NAMES[104]]

    assert main(["eval", url, "--annotations", annotations, "--dataset", "coco", "--json-out", "x/e.json", *flags]) == 2
    assert capsys.readouterr().err.startswith("batchdet: error: [Errno 2] No such file or directory")

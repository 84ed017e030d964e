"""COCO bbox accuracy of one dataset of an output, with pycocotools.

pycocotools is the implementation MLPerf's accuracy script uses, so the AP
printed here is directly comparable to MLPerf's target (``stats[0]``).
Output rows are matched to annotated images by file name (the basename of
``uri`` against COCO's ``file_name``), because an output only knows where an
image was read from, not its COCO id. ``label_id`` already is the COCO
category id and boxes are in pixels of the image, as COCO's are.

Only images that have an output row are evaluated, so running on a subset of
val2017 gives that subset's AP; the annotated images left out are reported.
Rows with ``status = 'error'`` are evaluated as images without detections
(they lower AP, as a failed image should).
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from batchdet.output.query import open_output, read_dataset
from batchdet.output.schema import STATUS_OK
from batchdet.storage import filesystem

#: (key, what pycocotools' summarize() prints before the number), in ``stats`` order.
METRICS: tuple[tuple[str, str], ...] = tuple(
    (key, f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ]")
    for key, title, kind, iou, area, dets in (
        ("AP", "Average Precision", "(AP)", "0.50:0.95", "all", 100),
        ("AP50", "Average Precision", "(AP)", "0.50", "all", 100),
        ("AP75", "Average Precision", "(AP)", "0.75", "all", 100),
        ("AP_small", "Average Precision", "(AP)", "0.50:0.95", "small", 100),
        ("AP_medium", "Average Precision", "(AP)", "0.50:0.95", "medium", 100),
        ("AP_large", "Average Precision", "(AP)", "0.50:0.95", "large", 100),
        ("AR1", "Average Recall", "(AR)", "0.50:0.95", "all", 1),
        ("AR10", "Average Recall", "(AR)", "0.50:0.95", "all", 10),
        ("AR100", "Average Recall", "(AR)", "0.50:0.95", "all", 100),
        ("AR_small", "Average Recall", "(AR)", "0.50:0.95", "small", 100),
        ("AR_medium", "Average Recall", "(AR)", "0.50:0.95", "medium", 100),
        ("AR_large", "Average Recall", "(AR)", "0.50:0.95", "large", 100),
    )
)


@dataclass
class EvalResult:
    output: str
    dataset: str
    annotations: str
    #: pycocotools' 12 numbers by METRICS key; -1 where the ground truth has nothing to measure.
    stats: dict[str, float]
    images_evaluated: int
    detections_evaluated: int
    #: URIs of matched error rows, evaluated as images without detections.
    error_images: list[str]
    #: Annotated file names without an output row (not evaluated).
    missing_output: list[str]
    #: URIs of output rows whose file name is not in the annotations (not evaluated).
    unannotated: list[str]
    #: URIs of output rows whose file name another row already had (not evaluated).
    duplicates: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(output: str, annotations: str, dataset: str,
             storage_options: dict[str, Any] | None = None) -> EvalResult:
    """COCO bbox evaluation of ``dataset`` in ``output`` against ``annotations`` (instances JSON).

    ``annotations`` may be a local path or any fsspec URL (same storage options).
    """
    gt = _load_coco(annotations, storage_options)
    rows = read_dataset(open_output(output, storage_options), dataset)
    ids_by_name = _ids_by_file_name(gt)

    chosen: dict[str, int] = {}  # file name -> row index; an ok row wins over an error row
    unannotated, duplicates = [], []
    uris, statuses = rows.column("uri").to_pylist(), rows.column("status").to_pylist()
    for i, (uri, status) in enumerate(zip(uris, statuses)):
        name = posixpath.basename(uri)
        if name not in ids_by_name:
            unannotated.append(uri)
        elif name not in chosen:
            chosen[name] = i
        elif statuses[chosen[name]] != STATUS_OK and status == STATUS_OK:
            duplicates.append(uris[chosen[name]])
            chosen[name] = i
        else:
            duplicates.append(uri)
    if not chosen:
        raise ValueError(f"none of the {rows.num_rows:,} images of dataset {dataset!r} has a file name "
                         f"listed in {annotations}")

    index = sorted(chosen.values())
    image_ids = [ids_by_name[posixpath.basename(uris[i])] for i in index]
    results = _coco_results(rows.column("detections").combine_chunks().take(index), image_ids)
    stats = _run_cocoeval(gt, results, image_ids)
    return EvalResult(
        output=output, dataset=dataset, annotations=annotations,
        stats=dict(zip((key for key, _ in METRICS), stats)),
        images_evaluated=len(index), detections_evaluated=len(results),
        error_images=[uris[i] for i in index if statuses[i] != STATUS_OK],
        missing_output=sorted(set(ids_by_name) - set(chosen)),
        unannotated=unannotated, duplicates=duplicates,
    )


def _load_coco(annotations: str, storage_options: dict[str, Any] | None) -> COCO:
    fs, path = filesystem(annotations, storage_options)
    with fs.open(path, "r") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotations} is not a COCO instances file (needs 'images' and 'annotations')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools chats on stdout
        coco.createIndex()
    return coco


def _ids_by_file_name(gt: COCO) -> dict[str, int]:
    ids: dict[str, int] = {}
    for image in gt.dataset["images"]:
        name = posixpath.basename(image["file_name"])
        if name in ids:
            raise ValueError(f"the annotations list the file name {name!r} twice, so images cannot be matched by name")
        ids[name] = image["id"]
    return ids


def _coco_results(detections: pa.ListArray, image_ids: list[int]) -> list[dict[str, Any]]:
    """COCO result dicts (xywh boxes) for the detections of each chosen row; null lists are empty."""
    flat = pc.list_flatten(detections)
    parent = pc.list_parent_indices(detections).to_numpy()
    image = np.asarray(image_ids, dtype=np.int64)[parent].tolist()
    col = {name: flat.field(name).to_numpy(zero_copy_only=False).astype(np.float64)
           for name in ("score", "x_min", "y_min", "x_max", "y_max")}
    labels = flat.field("label_id").to_pylist()
    w, h = col["x_max"] - col["x_min"], col["y_max"] - col["y_min"]
    return [
        {"image_id": i, "category_id": c, "bbox": [x, y, bw, bh], "score": s}
        for i, c, x, y, bw, bh, s in zip(image, labels, col["x_min"].tolist(), col["y_min"].tolist(),
                                         w.tolist(), h.tolist(), col["score"].tolist())
    ]


def _run_cocoeval(gt: COCO, results: list[dict[str, Any]], image_ids: list[int]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes cannot take an empty list; no detections is a valid (zero) result
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset.get("categories", []),
                          "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def render_eval(result: EvalResult, examples: int = 5) -> str:
    """pycocotools' summary lines, then what was and was not evaluated."""
    lines = [f"dataset {result.dataset} of {result.output} against {result.annotations}", ""]
    lines += [f"{label} = {result.stats[key]:0.3f}" for key, label in METRICS]
    lines += [
        "",
        f"AP = {100 * result.stats['AP']:.2f} % (COCO AP@[.5:.95], pycocotools stats[0], maxDets 100)",
        f"evaluated: {result.images_evaluated:,} images, {result.detections_evaluated:,} detections",
    ]
    if any(v == -1 for v in result.stats.values()):
        lines.append("-1.000: the ground truth has no object in that range")
    for items, what in (
        (result.error_images, "matched images had status 'error'; evaluated as images with no detections"),
        (result.missing_output, "annotated images have no output row; not evaluated"),
        (result.unannotated, "output rows have no annotated image of that file name; not evaluated"),
        (result.duplicates, "output rows repeat a file name already matched; not evaluated"),
    ):
        if items:
            shown = ", ".join(items[:examples]) + (", …" if len(items) > examples else "")
            lines.append(f"{len(items):,} {what}: {shown}")
    return "\n".join(lines) + "\n"

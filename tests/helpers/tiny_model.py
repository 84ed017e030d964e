"""A tiny ONNX model that meets batchdet's contract and whose answer is known.

It finds the bounding box of the bright pixels (red channel above mid-grey
after normalisation) in the 1200×1200 input and reports it as a "person";
a fixed box straying outside [0, 1] as a "stop sign" (class index 12 →
COCO id 13); and a below-threshold "toothbrush". So a test can predict, from
the image it drew, every value the whole pipeline must write: pixel-space
scaling, clipping, the label map, the score threshold and the sort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FIXED_BOX = [-0.1, 0.5, 0.3, 1.2]
SCORES = [0.6, 0.9, 0.01]  # stop sign, person, toothbrush: deliberately not sorted
LABEL_INDICES = [12, 1, 80]


def build() -> onnx.ModelProto:
    c = lambda name, value, dtype=np.int64: numpy_helper.from_array(np.asarray(value, dtype=dtype), name)  # noqa: E731
    inits = [
        c("zero", 0.0, np.float32), c("r_start", [0]), c("r_end", [1]), c("ax1", [1]),
        c("rev_start", [-1]), c("rev_end", [-1_000_000]), c("rev_step", [-1]), c("ax_last", [-1]),
        c("size", 1200.0, np.float32), c("one", 1.0, np.float32), c("last", 1199.0, np.float32),
        c("fixed_box", [FIXED_BOX], np.float32), c("low_box", [[0.0, 0.0, 0.1, 0.1]], np.float32),
        c("scores_c", [SCORES], np.float32), c("labels_c", [LABEL_INDICES]),
        c("shape_1x1x4", [1, 1, 4]),
    ]
    n = helper.make_node
    nodes = [
        n("Slice", ["image", "r_start", "r_end", "ax1"], ["red"]),  # [1,1,H,W]
        n("Greater", ["red", "zero"], ["bright_b"]),
        n("Cast", ["bright_b"], ["bright"], to=TensorProto.FLOAT),
        n("ReduceMax", ["bright"], ["cols"], axes=[0, 1, 2], keepdims=0),  # [W]
        n("ReduceMax", ["bright"], ["rows"], axes=[0, 1, 3], keepdims=0),  # [H]
    ]
    # first bright index along a profile, and first from the end
    for axis in ("cols", "rows"):
        nodes += [
            n("ArgMax", [axis], [f"{axis}_first_i"], axis=0, keepdims=1),
            n("Slice", [axis, "rev_start", "rev_end", "ax_last", "rev_step"], [f"{axis}_rev"]),
            n("ArgMax", [f"{axis}_rev"], [f"{axis}_last_ri"], axis=0, keepdims=1),
            n("Cast", [f"{axis}_first_i"], [f"{axis}_first"], to=TensorProto.FLOAT),
            n("Cast", [f"{axis}_last_ri"], [f"{axis}_last_rf"], to=TensorProto.FLOAT),
            n("Sub", ["last", f"{axis}_last_rf"], [f"{axis}_last"]),
            n("Add", [f"{axis}_last", "one"], [f"{axis}_end"]),
            n("Div", [f"{axis}_first", "size"], [f"{axis}_lo"]),
            n("Div", [f"{axis}_end", "size"], [f"{axis}_hi"]),
        ]
    nodes += [
        n("Concat", ["cols_lo", "rows_lo", "cols_hi", "rows_hi"], ["bright_box"], axis=0),
        n("Reshape", ["bright_box", "shape_1x1x4"], ["bright_box3"]),
        n("Reshape", ["fixed_box", "shape_1x1x4"], ["fixed_box3"]),
        n("Reshape", ["low_box", "shape_1x1x4"], ["low_box3"]),
        n("Concat", ["fixed_box3", "bright_box3", "low_box3"], ["bboxes"], axis=1),
        n("Identity", ["scores_c"], ["scores"]),
        n("Identity", ["labels_c"], ["labels"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 1200, 1200])],
        [
            helper.make_tensor_value_info("bboxes", TensorProto.FLOAT, [1, 3, 4]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 3]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def write(path: Path) -> Path:
    onnx.save(build(), str(path))
    return path


def expected(rect: tuple[int, int, int, int], width: int, height: int) -> list[dict]:
    """Detections for an image of ``width``×``height`` whose only bright
    pixels fill ``rect`` = (x0, y0, x1, y1), x1/y1 exclusive — in the
    1200×1200 resized space the box snaps to whole pixels, so values hold to
    one resized pixel (width/1200)."""
    x0, y0, x1, y1 = rect
    fixed = [min(max(v * s, 0.0), s) for v, s in zip(FIXED_BOX, (width, height, width, height))]
    return [
        {"label_id": 1, "label": "person", "score": 0.9, "box": [x0, y0, x1, y1]},
        {"label_id": 13, "label": "stop sign", "score": 0.6, "box": fixed},
    ]

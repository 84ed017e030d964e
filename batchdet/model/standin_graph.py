"""The ONNX plumbing of the stand-in: a graph builder, the SSD default boxes and the in-graph post-processing.

The graph is built at any opset of :data:`OPSETS` with the same nodes and
the same outputs: only the way an opset spells a node changes (before 13,
Unsqueeze takes ``axes`` as an attribute). The default is :data:`OPSET`, the
lowest the official file's graph can have (docs/model.md, "Opset"), so that
everything tested on a stand-in meets what users fetch.

These are the parts of the stand-in (batchdet/model/standin.py) that are the
official model's interface rather than its weights: the 15,130 default boxes
(docs/model.md) and the post-processing after the heads (decode, softmax,
NonMaxSuppression, top 200). :func:`build_postprocess` appends it to the full
model's graph; :func:`build_postprocess_model` wraps it into a tiny model
whose inputs are the raw head outputs, so decode and NMS can be tested
against a plain numpy reference without running a backbone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from batchdet.model.labels import NUM_CLASSES
from batchdet.model.spec import (
    BBOXES,
    INPUT_SIZE,
    KIND_KEY,
    LABELS,
    MAX_DETECTIONS,
    NMS_SCORE_THRESHOLD,
    OFFICIAL_MIN_OPSET,
    SCORES,
    STANDIN,
    STANDIN_KEY,
    STANDIN_OPSETS,
)

#: the default opset: the lowest the official file's graph can have (spec.OFFICIAL_MIN_OPSET)
OPSET = OFFICIAL_MIN_OPSET
OPSETS = STANDIN_OPSETS

# --- default boxes and heads (docs/model.md) ---------------------
FEAT_SIZES = (50, 25, 13, 7, 3, 3)
STEPS = (24, 48, 92, 171, 400, 400)
BOX_SCALES = (84, 180, 396, 612, 828, 1044, 1260)  # pixels of the 1200 input
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
#: default boxes per cell: (s, s), (s', s') and two per aspect ratio -> 4, 6, 6, 6, 4, 4.
BOXES_PER_CELL = tuple(2 + 2 * len(r) for r in ASPECT_RATIOS)
NUM_BOXES = sum(f * f * nd for f, nd in zip(FEAT_SIZES, BOXES_PER_CELL))  # 15,130
SCALE_XY, SCALE_WH = 0.1, 0.2
IOU_THRESHOLD = 0.5


def default_boxes() -> np.ndarray:
    """The 15,130 default boxes as float32 (cx, cy, w, h), normalised, clamped to [0, 1].

    Ordered like the heads' flattened output (box index = d·H·W + y·W + x,
    map by map): for each map, for each box size d, rows i, then columns j.
    Computed in float64 and cast once, as the reference computes them in
    Python floats.
    """
    rows = []
    for k, (feat, step, ratios) in enumerate(zip(FEAT_SIZES, STEPS, ASPECT_RATIOS)):
        fk = INPUT_SIZE // step
        s = BOX_SCALES[k] / INPUT_SIZE
        s_prime = math.sqrt(s * BOX_SCALES[k + 1] / INPUT_SIZE)
        sizes = [(s, s), (s_prime, s_prime)]
        for a in ratios:
            sizes += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
        centres = (np.arange(feat) + 0.5) / fk
        cy, cx = np.meshgrid(centres, centres, indexing="ij")  # rows i, then columns j
        for w, h in sizes:
            rows.append(np.stack([cx.ravel(), cy.ravel(), np.full(cx.size, w), np.full(cx.size, h)], axis=1))
    return np.clip(np.concatenate(rows), 0.0, 1.0).astype(np.float32)


class Graph:
    """Appends named nodes and initializers to a GraphProto.

    Each node's output is named after the node, which keeps the graph
    readable in Netron and makes intermediate tensors easy to expose.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int = OPSET) -> None:
        self.graph = graph
        self.opset = check_opset(opset)

    def const(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs) -> str:
        """Add one node; returns its (first) output name."""
        outputs = outputs or [name]
        self.graph.node.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def unsqueeze(self, x: str, axes: list[int], name: str) -> str:
        """Unsqueeze as this opset spells it: ``axes`` an attribute before 13, an input from 13."""
        if self.opset < 13:
            return self.op("Unsqueeze", [x], name, axes=axes)
        return self.op("Unsqueeze", [x, self.const(name + ".axes", np.array(axes, dtype=np.int64))], name)


def check_opset(opset: int) -> int:
    """``opset`` if the builder supports it; ValueError in one line otherwise."""
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS[0]}..{OPSETS[-1]} (NonMaxSuppression needs 10), got {opset}")
    return opset


def build_postprocess(graph: onnx.GraphProto, loc: str, conf: str, opset: int = OPSET) -> None:
    """Append the official post-processing to ``graph`` and declare its three outputs.

    ``loc`` names a float32 [1, 4, 15130] tensor (raw offsets t_x, t_y, t_w,
    t_h), ``conf`` a float32 [1, 81, 15130] tensor (raw class logits, class 0
    = background); both in :func:`default_boxes` order. Appends: decode
    (xy = 0.1·t_xy·wh_d + xy_d, wh = exp(0.2·t_wh)·wh_d, to x_min, y_min,
    x_max, y_max) → softmax over classes → drop background →
    NonMaxSuppression per class (IoU 0.5, score > 0.05, ≤ 200 per class) →
    TopK with k = min(200, selected) → ``bboxes`` [1, N, 4], ``labels``
    [1, N] int64 (class index 1..80), ``scores`` [1, N], best first. N = 0
    is a valid outcome.

    Only operators of opset 10 are used (no GatherND, no integer Min), so the
    nodes are the same at every opset of :data:`OPSETS`. As in the official
    file, NonMaxSuppression reads the boxes from a Concat and the class
    scores from a Slice.
    """
    g = Graph(graph, opset)
    p = "postprocess."
    boxes_whc = default_boxes()[None]  # [1, NUM_BOXES, 4]: NMS's layout, so the box Concat feeds it directly
    xy_d = g.const(p + "default_boxes_xy", boxes_whc[:, :, :2])
    wh_d = g.const(p + "default_boxes_wh", boxes_whc[:, :, 2:])
    i64 = lambda name, values: g.const(p + name, np.array(values, dtype=np.int64))  # noqa: E731
    f32 = lambda name, value: g.const(p + name, np.array(value, dtype=np.float32))  # noqa: E731
    axis2 = i64("axis2", [2])

    # decode, in the [1, boxes, 4] layout NMS wants
    t = g.op("Transpose", [loc], p + "offsets", perm=[0, 2, 1])
    t_xy = g.op("Slice", [t, i64("start0", [0]), i64("end2", [2]), axis2], p + "t_xy")
    t_wh = g.op("Slice", [t, i64("start2", [2]), i64("end4", [4]), axis2], p + "t_wh")
    xy = g.op("Mul", [t_xy, f32("scale_xy", SCALE_XY)], p + "xy_scaled")
    xy = g.op("Mul", [xy, wh_d], p + "xy_offset")
    xy = g.op("Add", [xy, xy_d], p + "xy")
    wh = g.op("Mul", [t_wh, f32("scale_wh", SCALE_WH)], p + "wh_scaled")
    wh = g.op("Exp", [wh], p + "wh_exp")
    wh = g.op("Mul", [wh, wh_d], p + "wh")
    half = g.op("Mul", [wh, f32("half", 0.5)], p + "half_wh")
    lt = g.op("Sub", [xy, half], p + "lt")
    rb = g.op("Add", [xy, half], p + "rb")
    boxes = g.op("Concat", [lt, rb], p + "boxes", axis=2)

    # Softmax before opset 13 flattens its input to 2-D at ``axis``, so it
    # runs with the class axis last, where both meanings agree.
    by_box = g.op("Transpose", [conf], p + "logits_by_box", perm=[0, 2, 1])
    probs = g.op("Softmax", [by_box], p + "softmax_by_box", axis=2)
    probs = g.op("Transpose", [probs], p + "softmax", perm=[0, 2, 1])  # [1, 81, boxes], the name it always had
    # scores per foreground class: [1, 80, boxes], NMS's layout
    fg = g.op("Slice", [probs, i64("start1", [1]), i64("end_classes", [NUM_CLASSES]), i64("axis1", [1])],
              p + "foreground")

    # boxes and foreground are [x_min, y_min, x_max, y_max]; NMS with
    # center_point_box=0 only needs a diagonal corner pair, in either order.
    selected = g.op(
        "NonMaxSuppression",
        [
            boxes,
            fg,
            i64("max_per_class", [MAX_DETECTIONS]),
            f32("iou_threshold", [IOU_THRESHOLD]),
            f32("score_threshold", [NMS_SCORE_THRESHOLD]),
        ],
        p + "nms",
        center_point_box=0,
    )  # [selected, 3] = (batch, class, box); the batch is always 0
    cls = g.op("Gather", [selected, i64("class_column", 1)], p + "class", axis=1)  # [selected]
    box = g.op("Gather", [selected, i64("box_column", 2)], p + "box", axis=1)
    # the selected scores, gathered from the flattened [80·boxes] scores (GatherND is opset 11)
    flat = g.op("Add", [g.op("Mul", [cls, i64("num_boxes", NUM_BOXES)], p + "class_offset"), box], p + "flat_index")
    fg_flat = g.op("Reshape", [fg, i64("flat_shape", [-1])], p + "foreground_flat")
    sel_scores = g.op("Gather", [fg_flat, flat], p + "selected_scores", axis=0)
    # k = min(200, selected) as a ReduceMin: integer Min is opset 12
    count = g.op("Shape", [sel_scores], p + "num_selected")
    both = g.op("Concat", [count, i64("max_detections", [MAX_DETECTIONS])], p + "k_candidates", axis=0)
    k = g.op("ReduceMin", [both], p + "k", axes=[0], keepdims=1)
    top_scores, top = p + "top_scores", p + "top_index"
    # TopK's defaults (largest, sorted) are what we want; the attributes only exist from opset 11
    g.op("TopK", [sel_scores, k], p + "topk", outputs=[top_scores, top], axis=0)
    top_box = g.op("Gather", [box, top], p + "top_box", axis=0)
    g.op("Gather", [boxes, top_box], BBOXES, axis=1)  # [1, k, 4]
    label = g.op("Add", [g.op("Gather", [cls, top], p + "top_class", axis=0), i64("one", 1)], p + "label")
    g.unsqueeze(label, [0], LABELS)
    g.unsqueeze(top_scores, [0], SCORES)
    graph.output.extend(
        [
            helper.make_tensor_value_info(BBOXES, TensorProto.FLOAT, [1, "N", 4]),
            helper.make_tensor_value_info(LABELS, TensorProto.INT64, [1, "N"]),
            helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, [1, "N"]),
        ]
    )


def finish_model(graph: onnx.GraphProto, metadata: dict[str, str], opset: int = OPSET) -> onnx.ModelProto:
    """The model of ``graph`` at ``opset``, checked by onnx's full checker (with shape inference).

    Its IR version is the lowest that carries ``opset`` (opset 10: IR 5), as
    an exporter of that time wrote it: an older runtime can load the file.
    """
    opsets = [helper.make_opsetid("", check_opset(opset))]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="batchdet.model.standin")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_postprocess_model(opset: int = OPSET) -> onnx.ModelProto:
    """A model with only the post-processing: inputs ``loc`` [1, 4, 15130] and ``conf`` [1, 81, 15130].

    Outputs are the contract's ``bboxes``/``labels``/``scores``; it exists so
    tests can check decode and NMS against numpy with hand-made head outputs.
    """
    graph = helper.make_graph(
        [],
        "batchdet_postprocess",
        [
            helper.make_tensor_value_info("loc", TensorProto.FLOAT, [1, 4, NUM_BOXES]),
            helper.make_tensor_value_info("conf", TensorProto.FLOAT, [1, NUM_CLASSES, NUM_BOXES]),
        ],
        [],
    )
    build_postprocess(graph, "loc", "conf", opset)
    return finish_model(graph, {KIND_KEY: STANDIN, STANDIN_KEY: "true"}, opset)

"""The stand-in model: architecture size, interface, and post-processing values.

Reference values come from docs/model.md (the model card facts) and are recomputed here in
plain numpy (default boxes by hand, decode, softmax, greedy NMS), never by
calling the code under test, so a mistake in ``batchdet.model.standin`` cannot
agree with itself.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper, shape_inference

from batchdet.model.spec import (
    BBOXES,
    INPUT_NAME,
    LABELS,
    MAX_DETECTIONS,
    MEAN,
    NMS_SCORE_THRESHOLD,
    KIND_KEY,
    SCORES,
    STANDIN_KEY,
    STD,
    check_model,
)
from batchdet.cli import main
from batchdet.model.standin import build_standin, write_standin
from batchdet.model.standin_graph import build_postprocess_model, default_boxes
from batchdet.pipeline.preprocess import prepare
from helpers.photos import photo

NUM_BOXES = 15130
NARROW = 8
# docs/model.md and the MLPerf architecture
GRIDS = (50, 25, 13, 7, 3, 3)
BOXES_PER_CELL = (4, 6, 6, 6, 4, 4)


# --- fixtures and helpers -----------------------------------------------------


@pytest.fixture(scope="module")
def full_proto() -> onnx.ModelProto:
    return build_standin(seed=0, channels_divisor=1)


@pytest.fixture(scope="module")
def narrow_proto() -> onnx.ModelProto:
    return build_standin(seed=0, channels_divisor=NARROW)


@pytest.fixture(scope="module", params=[10, 17], ids=["opset10", "opset17"])
def postprocess_session(request) -> ort.InferenceSession:
    """The post-processing at the official file's opset and at the newest, whose
    Softmax and Unsqueeze differ in meaning and spelling."""
    return _session(build_postprocess_model(opset=request.param))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _smooth_image(seed: int, cells: int = 8) -> np.ndarray:
    """A normalised [1, 3, 1200, 1200] image: random colours on a coarse grid, bilinearly blended."""
    grid = np.random.default_rng(seed).uniform(0, 255, (3, cells, cells))
    pos = np.linspace(0, cells - 1, 1200)
    lo = np.minimum(pos.astype(int), cells - 2)
    interp = np.zeros((1200, cells))
    interp[np.arange(1200), lo] = 1 - (pos - lo)
    interp[np.arange(1200), lo + 1] = pos - lo
    rgb = interp @ grid @ interp.T
    return ((rgb - MEAN[:, None, None]) / STD[:, None, None])[None].astype(np.float32)


def _flat_image(value: float = 128.0) -> np.ndarray:
    rgb = np.full((3, 1200, 1200), value)
    return ((rgb - MEAN[:, None, None]) / STD[:, None, None])[None].astype(np.float32)


def _check_contract(outputs: dict[str, np.ndarray]) -> int:
    """Assert the output contract of docs/model.md; returns N."""
    boxes, labels, scores = outputs[BBOXES], outputs[LABELS], outputs[SCORES]
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and scores.dtype == np.float32
    n = boxes.shape[1]
    assert boxes.shape == (1, n, 4) and labels.shape == (1, n) and scores.shape == (1, n)
    assert n <= MAX_DETECTIONS
    assert np.all(np.isfinite(boxes))
    assert np.all(boxes[0, :, 2] > boxes[0, :, 0]) and np.all(boxes[0, :, 3] > boxes[0, :, 1])
    assert np.all(np.diff(scores[0]) <= 0), "scores must be sorted high to low"
    assert np.all(scores > NMS_SCORE_THRESHOLD) and np.all(scores <= 1.0)
    assert np.all((labels >= 1) & (labels <= 80))
    return n


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


# --- 1. default boxes -----------------------------------------------------------


def test_default_boxes_layout_and_hand_computed_entries():
    boxes = default_boxes()
    assert boxes.shape == (NUM_BOXES, 4) and boxes.dtype == np.float32
    assert np.all((boxes >= 0) & (boxes <= 1))
    counts = [g * g * nd for g, nd in zip(GRIDS, BOXES_PER_CELL)]
    assert counts == [10000, 3750, 1014, 294, 36, 36] and sum(counts) == NUM_BOXES
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    s0, s1 = 84 / 1200, 180 / 1200
    expected = {
        0: (0.5 / 50, 0.5 / 50, s0, s0),  # map 0, size (s, s), row 0, col 0
        1: (1.5 / 50, 0.5 / 50, s0, s0),  # columns run fastest
        50: (0.5 / 50, 1.5 / 50, s0, s0),  # then rows
        2500: (0.01, 0.01, math.sqrt(s0 * s1), math.sqrt(s0 * s1)),  # first (s', s') box
        5000 + 50 + 3: (3.5 / 50, 1.5 / 50, s0 * math.sqrt(2), s0 / math.sqrt(2)),  # ratio 2, row 1, col 3
        7500: (0.01, 0.01, s0 / math.sqrt(2), s0 * math.sqrt(2)),  # ratio 1/2
        starts[1] + 4 * 625: (0.02, 0.02, s1 * math.sqrt(3), s1 / math.sqrt(3)),  # map 1, ratio 3
        starts[3] + 48: (6.5 / 7, 6.5 / 7, 612 / 1200, 612 / 1200),  # map 3 (fk = 1200 // 171 = 7), last cell
        starts[5]: (0.5 / 3, 0.5 / 3, 1044 / 1200, 1044 / 1200),  # first box of the last map
        starts[5] + 2 * 9: (0.5 / 3, 0.5 / 3, 1.0, 1044 / 1200 / math.sqrt(2)),  # w = 1.23 clamped to 1
    }
    for index, want in expected.items():
        np.testing.assert_allclose(boxes[index], want, rtol=1e-6, err_msg=f"default box {index}")


# --- 2. size of the architecture -------------------------------------------------


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _trainable_parameters(model: onnx.ModelProto) -> int:
    """What torch's ``parameters()`` counts: conv weight and bias, BN weight and bias.

    BN running mean/var are buffers in torch, not parameters, so they are
    left out (9,856 values in the full model); so are the post-processing
    constants (default boxes). Counting every initializer instead gives
    20.04 M, even closer to the card's 20.058 M, which most likely counts
    every tensor of the file.
    """
    inits = _initializers(model)
    names = set()
    for node in model.graph.node:
        if node.op_type == "Conv":
            names.update(node.input[1:])
        elif node.op_type == "BatchNormalization":
            names.update(node.input[1:3])
    return sum(int(np.prod(inits[n].dims)) for n in names)


def _conv_output_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Output shape of every Conv node by ONNX shape inference.

    The big float initializers are swapped for graph inputs of the same
    shape first: inference only needs their shapes, and skipping 80 MB of
    data makes it take milliseconds instead of seconds.
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph = light.graph
    big = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]
    for t in big:
        graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        graph.initializer.remove(t)
    inferred = shape_inference.infer_shapes(light, strict_mode=True)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    return {n.output[0]: dims[n.output[0]] for n in model.graph.node if n.op_type == "Conv"}


def _conv_flops(model: onnx.ModelProto) -> int:
    """2 × out_h·out_w·out_c·(in_c/group)·kh·kw summed over every Conv (one multiply-add = 2 FLOPs)."""
    inits = _initializers(model)
    shapes = _conv_output_shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        _, out_c, out_h, out_w = shapes[node.output[0]]
        w_out, w_in_per_group, kh, kw = inits[node.input[1]].dims
        assert w_out == out_c
        total += 2 * out_h * out_w * out_c * w_in_per_group * kh * kw
    return total


def test_full_model_parameter_count(full_proto):
    params = _trainable_parameters(full_proto)
    assert abs(params - 20.0e6) / 20.0e6 < 0.01, params  # 19,972,534


def test_full_model_gflops_and_head_grids(full_proto):
    flops = _conv_flops(full_proto)
    assert abs(flops / 1e9 - 433.0) / 433.0 < 0.02, flops / 1e9  # 432.8
    shapes = _conv_output_shapes(full_proto)
    assert shapes["backbone.layer3.5.conv2"] == [1, 256, 150, 150]
    # Each head is [1, k·nd, H, W] viewed as [1, k, nd·H·W] (channel k·nd + d -> box d·H·W + y·W + x),
    # concatenated map by map: the order default_boxes() follows.
    inits = _initializers(full_proto)
    nodes = {n.name: n for n in full_proto.graph.node}
    for kind, per_box in (("loc", 4), ("conf", 81)):
        flats = []
        for m, (grid, nd) in enumerate(zip(GRIDS, BOXES_PER_CELL)):
            assert shapes[f"{kind}.{m}"] == [1, per_box * nd, grid, grid]
            reshape = next(n for n in nodes.values() if n.op_type == "Reshape" and n.input[0] == f"{kind}.{m}")
            assert numpy_helper.to_array(inits[reshape.input[1]]).tolist() == [1, per_box, nd * grid * grid]
            flats.append(reshape.output[0])
        concat = next(n for n in nodes.values() if n.op_type == "Concat" and n.input[0] == flats[0])
        assert list(concat.input) == flats and concat.attribute[0].i == 2


def test_narrow_model_is_much_smaller_with_the_same_interface(full_proto, narrow_proto):
    assert _trainable_parameters(narrow_proto) < _trainable_parameters(full_proto) / 10
    assert _conv_flops(narrow_proto) < _conv_flops(full_proto) / 20
    for values in ("input", "output"):
        signature = lambda m: [(v.name, str(v.type)) for v in getattr(m.graph, values)]  # noqa: E731
        assert signature(narrow_proto) == signature(full_proto)
    meta = {p.key: p.value for p in narrow_proto.metadata_props}
    assert meta == {KIND_KEY: "standin", STANDIN_KEY: "true", "batchdet.seed": "0",
                    "batchdet.channels_divisor": str(NARROW)}
    assert [(o.domain, o.version) for o in narrow_proto.opset_import] == [("", 10)]
    assert narrow_proto.ir_version == 5


@pytest.mark.parametrize("divisor", [0, 3, 128])
def test_channels_divisor_must_divide_the_widths(divisor):
    with pytest.raises(ValueError):
        build_standin(channels_divisor=divisor)


# --- 2b. opsets ---------------------------------------------------------------------

#: the IR version each opset first appeared with (onnx's docs/Versioning.md table)
IR_OF_OPSET = {10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8}
OPSET_PHOTOS = ("rocket.jpg", "astronaut.png", "coffee.png")


def test_default_stand_in_has_the_official_files_known_interface(narrow_proto):
    """Opset 10 (NonMaxSuppression's first), IR 5, valid by onnx's full check, and what is known of
    the official graph: input ``image``, outputs ``bboxes``/``labels``/``scores``, and
    NonMaxSuppression fed by the box Concat and a class-score Slice (docs/model.md, "Opset")."""
    onnx.checker.check_model(narrow_proto, full_check=True)
    assert [i.name for i in narrow_proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in narrow_proto.graph.output] == [BBOXES, LABELS, SCORES]
    producers = {out: n.op_type for n in narrow_proto.graph.node for out in n.output}
    (nms,) = [n for n in narrow_proto.graph.node if n.op_type == "NonMaxSuppression"]
    assert [producers[nms.input[0]], producers[nms.input[1]]] == ["Concat", "Slice"]
    # an op newer than opset 10 would have been refused by the checker; these two are the ones
    # the opset-17 graph used to need (GatherND is opset 11, an integer Min opset 12)
    assert not {"GatherND", "Min"} & set(producers.values())


@pytest.fixture(scope="module")
def photo_inputs() -> list[np.ndarray]:
    """Real photos as the pipeline feeds them to the model."""
    return [prepare(photo(name)).tensor for name in OPSET_PHOTOS]


@pytest.fixture(scope="module")
def default_outputs(narrow_proto, photo_inputs) -> list[dict[str, np.ndarray]]:
    """The default opset's outputs on :func:`photo_inputs`: once, not once per opset compared to them."""
    session = _session(narrow_proto)
    return [_run(session, {INPUT_NAME: x}) for x in photo_inputs]


@pytest.mark.parametrize("opset", sorted(IR_OF_OPSET))
def test_every_opset_gives_the_same_detections_on_photos(narrow_proto, photo_inputs, default_outputs, opset):
    """Same seed, another opset: a valid file of that opset's IR version whose outputs on real
    photos are bit for bit the default's (a Softmax left over the wrong axis before 13, or a
    dropped TopK order, would change them), with the same operators."""
    model = build_standin(seed=0, channels_divisor=NARROW, opset=opset)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    assert model.ir_version == IR_OF_OPSET[opset]
    onnx.checker.check_model(model, full_check=True)
    assert sorted(n.op_type for n in model.graph.node) == sorted(n.op_type for n in narrow_proto.graph.node)
    got = _session(model)
    for x, reference in zip(photo_inputs, default_outputs, strict=True):
        outputs = _run(got, {INPUT_NAME: x})
        assert _check_contract(reference) > 0
        for name in (BBOXES, LABELS, SCORES):
            np.testing.assert_array_equal(outputs[name], reference[name], err_msg=f"opset {opset}: {name}")


@pytest.mark.parametrize("opset", [9, 18])
def test_an_opset_outside_the_tested_range_is_refused(opset, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"opset must be one of 10..17 .*got {opset}") as e:
        build_standin(channels_divisor=NARROW, opset=opset)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["model", "standin", "--to", str(tmp_path / "m.onnx"), "--opset", str(opset)])
    assert e.value.code == 2
    assert f"argument --opset: invalid choice: {opset}" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_model_standin_cli_builds_at_the_asked_opset(tmp_path, capsys):
    """Default: the official file's lowest possible opset; ``--opset`` another, which ``model info`` prints."""
    default, newer = tmp_path / "default.onnx", tmp_path / "opset12.onnx"
    assert main(["model", "standin", "--to", str(default), "--channels-divisor", str(NARROW)]) == 0
    assert main(["model", "standin", "--to", str(newer), "--channels-divisor", str(NARROW), "--opset", "12"]) == 0
    out = capsys.readouterr().out
    assert f"stand-in written: {default} (opset 10)" in out and f"stand-in written: {newer} (opset 12)" in out
    assert (check_model(default).opset, check_model(newer).opset) == (10, 12)
    assert [o.version for o in onnx.load(str(newer)).opset_import] == [12]
    assert main(["model", "info", str(newer)]) == 0
    assert "\nopset:       12\n" in capsys.readouterr().out


# --- 3. inference ------------------------------------------------------------------


def test_narrow_model_runs_and_meets_the_contract(narrow_proto):
    session = _session(narrow_proto)
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    smooth_a = _check_contract(out_a := _run(session, {INPUT_NAME: _smooth_image(1)}))
    smooth_b = _check_contract(out_b := _run(session, {INPUT_NAME: _smooth_image(2)}))
    flat = _check_contract(_run(session, {INPUT_NAME: _flat_image()}))
    assert smooth_a > 0 and smooth_b > 0
    assert flat < min(smooth_a, smooth_b), "detections must depend on content"
    assert smooth_a != smooth_b or not np.array_equal(out_a[BBOXES], out_b[BBOXES])


@pytest.mark.slow
def test_full_model_runs_and_meets_the_contract(full_proto):
    outputs = _run(_session(full_proto), {INPUT_NAME: _smooth_image(1)})
    assert _check_contract(outputs) > 0


# --- 4. post-processing against numpy ------------------------------------------------


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    wh = np.clip(np.minimum(box[2:], others[:, 2:]) - np.maximum(box[:2], others[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def _reference_postprocess(loc: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's post-processing (docs/model.md) in numpy: loc [4, B], conf [81, B] -> boxes [N, 4], labels [N], scores [N]."""
    dbox = default_boxes()
    t = loc.T
    xy = t[:, :2] * np.float32(0.1) * dbox[:, 2:] + dbox[:, :2]
    wh = np.exp(t[:, 2:] * np.float32(0.2)) * dbox[:, 2:]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    z = conf.astype(np.float64)
    probs = np.exp(z - z.max(axis=0))
    probs /= probs.sum(axis=0)
    found = []  # (score, label, box index)
    for label in range(1, 81):
        score = probs[label]
        order = np.flatnonzero(score > NMS_SCORE_THRESHOLD)
        order = order[np.argsort(-score[order], kind="stable")]
        alive = np.ones(len(order), bool)
        kept = 0
        for i in range(len(order)):
            if not alive[i] or kept == MAX_DETECTIONS:
                continue
            kept += 1
            found.append((score[order[i]], label, order[i]))
            alive[i + 1 :] &= _iou(boxes[order[i]], boxes[order[i + 1 :]]) <= 0.5
    found.sort(key=lambda f: -f[0])
    found = found[:MAX_DETECTIONS]
    index = np.array([f[2] for f in found], dtype=int)
    return boxes[index], np.array([f[1] for f in found], dtype=np.int64), np.array([f[0] for f in found])


def _postprocess(session: ort.InferenceSession, loc: np.ndarray, conf: np.ndarray) -> dict[str, np.ndarray]:
    outputs = _run(session, {"loc": loc[None].astype(np.float32), "conf": conf[None].astype(np.float32)})
    _check_contract(outputs)
    return {k: v[0] for k, v in outputs.items()}


@pytest.mark.parametrize(("blobs", "truncated"), [(3, False), (12, True)], ids=["under-200", "over-200"])
def test_postprocess_matches_numpy_reference(postprocess_session, blobs, truncated):
    # Background wins everywhere except in a few runs of consecutive boxes
    # (neighbouring cells of one size: IoU often > 0.5) where one class is
    # likely, so NMS has real work: it drops about half of the candidates.
    rng = np.random.default_rng(7)
    width = 300 if truncated else 100
    loc = rng.normal(0.0, 0.5, (4, NUM_BOXES)).astype(np.float32)
    conf = rng.normal(0.0, 1.0, (81, NUM_BOXES)).astype(np.float32)
    conf[0] += 9.0
    for label, start in zip(rng.integers(1, 81, blobs), rng.integers(0, NUM_BOXES - width, blobs)):
        conf[label, start : start + width] += rng.uniform(7.0, 13.0, width).astype(np.float32)
    got = _postprocess(postprocess_session, loc, conf)
    boxes, labels, scores = _reference_postprocess(loc, conf)
    assert (len(scores) == MAX_DETECTIONS) == truncated and len(scores) > 50
    assert got[SCORES].shape == scores.shape
    np.testing.assert_allclose(got[SCORES], scores, atol=1e-5)
    # equal scores may come out in either order: compare label-major
    order_got, order_ref = np.lexsort((-got[SCORES], got[LABELS])), np.lexsort((-scores, labels))
    np.testing.assert_array_equal(got[LABELS][order_got], labels[order_ref])
    np.testing.assert_allclose(got[BBOXES][order_got], boxes[order_ref], atol=1e-5)


# --- 5. NMS behaviour on hand-made boxes -----------------------------------------------

BACKGROUND_ONLY = -30.0  # logit of every class not asked for: e^-30 of probability


def _encode(index: int, ltrb: tuple[float, float, float, float]) -> np.ndarray:
    """The loc column that decodes to box ``ltrb`` at default box ``index`` (the model's decode inverted)."""
    cx, cy, w, h = default_boxes()[index].astype(np.float64)
    x0, y0, x1, y1 = ltrb
    return np.array(
        [
            ((x0 + x1) / 2 - cx) / (0.1 * w),
            ((y0 + y1) / 2 - cy) / (0.1 * h),
            math.log((x1 - x0) / w) / 0.2,
            math.log((y1 - y0) / h) / 0.2,
        ]
    )


def _heads(detections: list[tuple[int, tuple[float, float, float, float] | None, dict[int, float]]]):
    """loc/conf where default box ``index`` decodes to ``ltrb`` (None: the default box itself) with class scores."""
    loc = np.zeros((4, NUM_BOXES))
    conf = np.full((81, NUM_BOXES), BACKGROUND_ONLY)
    conf[0] = 0.0
    for index, ltrb, scores in detections:
        if ltrb is not None:
            loc[:, index] = _encode(index, ltrb)
        conf[0, index] = math.log(1.0 - sum(scores.values()))
        for label, p in scores.items():
            conf[label, index] = math.log(p)
    return loc, conf


def _pair(iou: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two 0.2 x 0.1 boxes side by side whose IoU is ``iou``: (w - dx) / (w + dx)."""
    w, dx = 0.2, 0.2 * (1 - iou) / (1 + iou)
    return (0.3, 0.4, 0.3 + w, 0.5), (0.3 + dx, 0.4, 0.3 + w + dx, 0.5)


def test_nms_keeps_the_best_of_overlapping_boxes_of_one_class(postprocess_session):
    a, b = _pair(0.8)
    got = _postprocess(postprocess_session, *_heads([(100, a, {5: 0.6}), (101, b, {5: 0.9})]))
    np.testing.assert_allclose(got[SCORES], [0.9], atol=1e-6)
    np.testing.assert_array_equal(got[LABELS], [5])
    np.testing.assert_allclose(got[BBOXES], [b], atol=1e-6)


def test_nms_is_per_class(postprocess_session):
    a, b = _pair(0.8)
    got = _postprocess(postprocess_session, *_heads([(100, a, {5: 0.6}), (101, b, {7: 0.9})]))
    np.testing.assert_array_equal(got[LABELS], [7, 5])
    np.testing.assert_allclose(got[BBOXES], [b, a], atol=1e-6)


def test_nms_same_box_scored_for_two_classes_gives_two_detections(postprocess_session):
    a, _ = _pair(0.8)
    got = _postprocess(postprocess_session, *_heads([(100, a, {3: 0.5, 80: 0.3})]))
    np.testing.assert_array_equal(got[LABELS], [3, 80])
    np.testing.assert_allclose(got[SCORES], [0.5, 0.3], atol=1e-6)


@pytest.mark.parametrize(("iou", "kept"), [(0.48, 2), (0.52, 1)])
def test_nms_iou_threshold_is_one_half(postprocess_session, iou, kept):
    a, b = _pair(iou)
    np.testing.assert_allclose(_iou(np.array(a), np.array([b])), [iou], atol=1e-9)
    got = _postprocess(postprocess_session, *_heads([(100, a, {1: 0.7}), (2600, b, {1: 0.8})]))
    assert len(got[SCORES]) == kept


def test_scores_below_threshold_are_dropped(postprocess_session):
    far = (0.1, 0.1, 0.2, 0.2), (0.7, 0.7, 0.9, 0.9), (0.4, 0.1, 0.5, 0.3)
    got = _postprocess(
        postprocess_session, *_heads([(0, far[0], {2: 0.04}), (1, far[1], {2: 0.06}), (2, far[2], {9: 0.049})])
    )
    np.testing.assert_allclose(got[SCORES], [0.06], atol=1e-6)
    np.testing.assert_array_equal(got[LABELS], [2])


def test_no_detection_gives_empty_outputs(postprocess_session):
    got = _run(postprocess_session, {k: v[None].astype(np.float32) for k, v in zip(("loc", "conf"), _heads([]))})
    assert got[BBOXES].shape == (1, 0, 4) and got[LABELS].shape == (1, 0) and got[SCORES].shape == (1, 0)
    assert got[LABELS].dtype == np.int64


@pytest.mark.parametrize("classes", [1, 80], ids=["one-class", "all-classes"])
def test_more_than_200_candidates_give_the_top_200(postprocess_session, classes):
    # (s, s) default boxes of map 0 two cells apart overlap with IoU 0.27: NMS keeps all of them.
    cells = [row * 50 + col for row in range(0, 50, 2) for col in range(0, 50, 2)]  # 625
    scores = np.random.default_rng(3).permutation(np.linspace(0.06, 0.9, len(cells)))
    labels = np.arange(len(cells)) % classes + 1
    got = _postprocess(
        postprocess_session, *_heads([(c, None, {int(k): float(p)}) for c, k, p in zip(cells, labels, scores)])
    )
    top = np.argsort(-scores)[:MAX_DETECTIONS]
    np.testing.assert_allclose(got[SCORES], scores[top], atol=1e-6)
    np.testing.assert_array_equal(got[LABELS], labels[top])
    cx, cy, w, h = default_boxes()[np.array(cells)[top]].T
    np.testing.assert_allclose(got[BBOXES], np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), atol=1e-6)


# --- 6. determinism ---------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_weights(narrow_proto):
    again = build_standin(seed=0, channels_divisor=NARROW)
    assert again.SerializeToString() == narrow_proto.SerializeToString()
    other = build_standin(seed=1, channels_divisor=NARROW)
    a, b = _initializers(narrow_proto), _initializers(other)
    assert a.keys() == b.keys()
    differ = [n for n in a if not np.array_equal(numpy_helper.to_array(a[n]), numpy_helper.to_array(b[n]))]
    assert "backbone.conv1.weight" in differ and "conf.0.weight" in differ
    assert not any(n.startswith("postprocess.") for n in differ)
    assert {p.key: p.value for p in other.metadata_props}["batchdet.seed"] == "1"


# --- 7. writing -------------------------------------------------------------------------


def test_write_standin_is_atomic_and_passes_the_contract_gate(tmp_path):
    target = tmp_path / "models" / "nested" / "standin.onnx"
    assert write_standin(target, seed=1, channels_divisor=NARROW) == target
    assert write_standin(target, seed=2, channels_divisor=NARROW) == target  # replaces in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["standin.onnx"]  # no temp file left
    loaded = onnx.load(str(target))
    assert {p.key: p.value for p in loaded.metadata_props}["batchdet.seed"] == "2"
    info = check_model(target)
    assert info.kind_id == "standin" and info.kind == "STAND-IN (random weights: detections are meaningless)"
    assert not info.official and not info.int8 and info.input_shape == (1, 3, 1200, 1200)
    assert info.outputs[BBOXES] == (1, "N", 4)

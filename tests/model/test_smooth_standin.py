"""The smooth stand-in (docs/model.md, "Stand-ins"): the random stand-in's graph with
weights whose detections hold still under noise, as a trained network's do.

Stability is measured as issue 25 states it: on 20 real photographs, uniform
noise of ±0.5 grey level added to the model's input must keep >= 95 % of the
detections scoring >= 0.5 (same label, every box edge within 2 px). The
random stand-in is measured the same way and must fail it, so the measure can
tell the two apart.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from batchdet.cli import main
from batchdet.model.spec import INPUT_NAME, STD, check_model
from batchdet.model.standin import build_standin
from batchdet.pipeline.postprocess import select
from batchdet.pipeline.preprocess import prepare
from helpers.photos import REAL_PHOTOS, photo

NARROW = 8
MIN_SCORE = 0.5
BOX_PX = 2.0


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def smooth_proto() -> onnx.ModelProto:
    return build_standin(seed=0, channels_divisor=NARROW, smooth=True)


@pytest.fixture(scope="module")
def random_proto() -> onnx.ModelProto:
    return build_standin(seed=0, channels_divisor=NARROW)


def _detections(session: ort.InferenceSession, x: np.ndarray, width: int, height: int):
    """(boxes in pixels of the original, labels, scores) as the pipeline keeps them."""
    bboxes, labels, scores = session.run(None, {INPUT_NAME: x})
    return select(bboxes[0], labels[0], scores[0], width, height)


def kept_under_noise(session: ort.InferenceSession, names: tuple[str, ...], seed: int = 1) -> dict:
    """For each photo, the detections scoring >= 0.5 without noise, and how many of
    them a run with ±0.5 grey of uniform noise finds again (same label, every edge
    within 2 px); also their labels and sizes, to judge how plausible they are."""
    rng = np.random.default_rng(seed)
    per_photo, labels, sides = [], set(), []
    for name in names:
        p = prepare(photo(name))
        x = p.tensor
        grey = rng.uniform(-0.5, 0.5, x.shape).astype(np.float32)
        noisy = x + grey / np.asarray(STD, np.float32)[None, :, None, None]  # grey levels in the model's units
        boxes, classes, scores = _detections(session, x, p.width, p.height)
        again = _detections(session, noisy, p.width, p.height)
        strong = scores >= MIN_SCORE
        kept = sum(
            bool((np.abs(again[0][again[1] == c] - box).max(axis=1) <= BOX_PX).any())
            for box, c in zip(boxes[strong], classes[strong])
        )
        per_photo.append((int(strong.sum()), kept))
        labels |= set(classes[strong].tolist())
        wh = boxes[strong, 2:] - boxes[strong, :2]
        sides += np.sqrt(wh.prod(axis=1) / (p.width * p.height)).tolist()
    strong_total = sum(n for n, _ in per_photo)
    return {"per_photo": per_photo, "strong": strong_total, "kept": sum(k for _, k in per_photo) / strong_total,
            "labels": labels, "sides": np.array(sides)}


def test_smooth_stand_in_keeps_its_detections_under_half_a_grey_level_of_noise(smooth_proto):
    """>= 95 % kept over the 16 photos, and detections a trained SSD could plausibly give:
    tens per photo on most, spread over classes and over box sizes."""
    got = kept_under_noise(_session(smooth_proto), REAL_PHOTOS)
    assert len(REAL_PHOTOS) >= 16
    assert got["kept"] >= 0.95, got
    counts = [n for n, _ in got["per_photo"]]
    assert sum(n >= 10 for n in counts) >= len(counts) // 2, counts
    assert len(got["labels"]) >= 40, sorted(got["labels"])
    # side of the box over the image's: the fine maps' small boxes and the coarse maps' large ones
    sides = got["sides"]
    assert (sides < 0.1).sum() >= 20 and (sides > 0.5).sum() >= 20, np.histogram(sides, [0, 0.1, 0.3, 0.5, 1.5])


def test_the_random_stand_in_fails_the_same_measure(random_proto):
    """The measure tells the two apart: the random stand-in's detections move (issue 25 measured 15 %
    kept on the full one); a third of its photos are enough to show it."""
    got = kept_under_noise(_session(random_proto), REAL_PHOTOS[::3])
    assert got["strong"] >= 100 and got["kept"] < 0.8, got


def test_same_graph_as_the_random_stand_in_other_weights(smooth_proto, random_proto):
    """Same nodes, tensor names and initializer shapes (so the same parameters, FLOPs and
    interface as the official file: tests/model/test_standin.py checks those on the random
    one), other weights; and it says what it is."""
    def nodes(m):
        return [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]

    assert nodes(smooth_proto) == nodes(random_proto)
    assert [(v.name, str(v.type)) for v in smooth_proto.graph.output] == [
        (v.name, str(v.type)) for v in random_proto.graph.output]
    smooth = {i.name: numpy_helper.to_array(i) for i in smooth_proto.graph.initializer}
    rand = {i.name: numpy_helper.to_array(i) for i in random_proto.graph.initializer}
    assert {k: v.shape for k, v in smooth.items()} == {k: v.shape for k, v in rand.items()}
    assert not np.array_equal(smooth["backbone.layer1.0.conv1.weight"], rand["backbone.layer1.0.conv1.weight"])
    assert all(np.array_equal(smooth[k], rand[k]) for k in smooth if k.startswith("postprocess."))
    meta = {p.key: p.value for p in smooth_proto.metadata_props}
    assert meta["batchdet.weights"] == "smooth" and meta["batchdet.channels_divisor"] == str(NARROW)
    assert "batchdet.weights" not in {p.key for p in random_proto.metadata_props}  # random: as before
    again = build_standin(seed=0, channels_divisor=NARROW, smooth=True)
    assert again.SerializeToString() == smooth_proto.SerializeToString()  # rebuilt byte for byte


def test_smooth_kernels_are_blurs_with_a_small_random_part(smooth_proto):
    """Each spatial kernel is a channel mix times a blur plus a tenth of a random kernel: its
    taps, seen per (output, input) pair, are mostly the blur's shape (the part that makes
    noise average away), which a random kernel's are not."""
    weights = {i.name: numpy_helper.to_array(i) for i in smooth_proto.graph.initializer}
    w = weights["backbone.layer2.1.conv1.weight"].astype(np.float64)  # [out, in, 3, 3]
    blur = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    flat = w.reshape(-1, 9)
    along = flat @ blur.ravel() / np.linalg.norm(blur)  # each kernel's component along the blur
    share = (along**2).sum() / (flat**2).sum()
    assert share > 0.8, share  # a random kernel's share would be about 1/9


def test_model_standin_smooth_cli(tmp_path, capsys):
    path = tmp_path / "smooth.onnx"
    assert main(["model", "standin", "--smooth", "--to", str(path), "--channels-divisor", str(NARROW)]) == 0
    out = capsys.readouterr().out
    assert f"stand-in written: {path} (opset 10)" in out and "smooth weights" in out and "meaningless" in out
    info = check_model(path)
    assert info.kind_id == "standin" and info.smooth
    assert info.kind == "STAND-IN (smooth weights: stable detections, still meaningless)"
    assert main(["model", "info", str(path)]) == 0
    assert "STAND-IN (smooth weights" in capsys.readouterr().out

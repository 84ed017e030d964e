"""The Ray Data stages as plain functions, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from batchdet.output.schema import SCHEMA
from batchdet.pipeline.detector import Detector
from batchdet.pipeline.postprocess import detections_column, select, to_detections
from batchdet.pipeline.stages import InferenceStage, read_batch
from helpers.photos import photo


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    """A read block as read_batch makes it: good files, a broken one, an unreadable one."""
    folder = tmp_path_factory.mktemp("files")
    files = {"rocket.jpg": photo("rocket.jpg"), "chelsea.png": photo("chelsea.png"), "broken.jpg": b"not an image"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    uris = [str(folder / n) for n in ("rocket.jpg", "broken.jpg", "gone.jpg", "chelsea.png", "rocket.jpg")]
    return read_batch(pa.table({"dataset": ["a", "a", "a", "b", "b"], "uri": uris}))


def test_read_batch_keeps_bytes_and_errors(block):
    assert block.column("data")[0].as_py() == photo("rocket.jpg")
    errors = block.column("error").to_pylist()
    assert errors[2].startswith("ReadError: not found") and block.column("data")[2].as_py() is None
    assert errors[0] is None and errors[1] is None  # a broken image is found out by the decoder, later


@pytest.mark.parametrize("prepare_threads", [0, 2])  # the CPU path (one reused buffer) and the GPU one (a pool)
def test_inference_stage_rows_equal_the_single_image_detector(narrow_model, block, prepare_threads):
    stage = InferenceStage(narrow_model, "run-1", threads=1, score_threshold=0.2, prepare_threads=prepare_threads)
    out = stage(block)
    assert out.schema == SCHEMA
    rows = out.to_pylist()
    assert [r["uri"] for r in rows] == block.column("uri").to_pylist()
    assert [r["dataset"] for r in rows] == ["a", "a", "a", "b", "b"] and {r["run_id"] for r in rows} == {"run-1"}
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok", "ok"]
    assert rows[1]["error"].startswith("DecodeError") and rows[2]["error"].startswith("ReadError")
    assert rows[1]["detections"] is None and rows[1]["width"] is None
    reference = Detector(narrow_model, threads=1, score_threshold=0.2)  # the independent single-image path
    for i, name in ((0, "rocket.jpg"), (3, "chelsea.png"), (4, "rocket.jpg")):
        want = reference.detect(photo(name))
        assert (rows[i]["width"], rows[i]["height"]) == (want.width, want.height)
        assert rows[i]["detections"] == want.detections and want.detections  # float32 both ways: exact


def test_a_gpu_actors_input_buffers_taken_in_turn_never_overwrite_one_in_use(narrow_model, tmp_path):
    """One prepare thread: three input buffers in turn over seven distinct
    photos, so each is reused twice while others are being prepared; every
    row is still the single-image detector's."""
    names = ("rocket.jpg", "chelsea.png", "astronaut.png", "coffee.png", "camera.png", "ihc.png",
             "retina.jpg")
    for name in names:
        (tmp_path / name).write_bytes(photo(name))
    batch = read_batch(pa.table({"dataset": ["a"] * len(names), "uri": [str(tmp_path / n) for n in names]}))
    stage = InferenceStage(narrow_model, "run-1", threads=1, score_threshold=0.2, prepare_threads=1)
    assert len(stage._inputs) == 3
    rows = stage(batch).to_pylist()
    reference = Detector(narrow_model, threads=1, score_threshold=0.2)
    assert [r["detections"] for r in rows] == [reference.detect(photo(n)).detections for n in names]
    assert all(r["detections"] for r in rows)


def test_detections_column_equals_per_image_dicts():
    """The Arrow-built column holds exactly to_detections' dicts, image by image."""
    rng = np.random.default_rng(0)
    raws, sizes = [], []
    for n in (0, 1, 7, 200, 3):
        raws.append((rng.uniform(-0.1, 1.1, (n, 4)).astype(np.float32), rng.integers(1, 81, n),
                     rng.uniform(0, 1, n).astype(np.float32)))
        sizes.append((int(rng.integers(1, 2000)), int(rng.integers(1, 2000))))
    selected = [select(*raw, w, h, 0.3) for raw, (w, h) in zip(raws, sizes)]
    column = detections_column([selected[0], None, *selected[1:]])
    got = column.to_pylist()
    assert got[1] is None and column.null_count == 1
    for dets, raw, (w, h) in zip([got[0], *got[2:]], raws, sizes):
        assert dets == to_detections(*raw, w, h, 0.3)
    assert detections_column([]).to_pylist() == [] and detections_column([None]).to_pylist() == [None]


def test_model_output_outside_the_label_map_is_an_error_row(narrow_model, block):
    stage = InferenceStage(narrow_model, "run-1", threads=1)

    class Wrong:  # a model emitting class index 0 (background): not a conforming file
        def predict(self, image):
            from batchdet.pipeline.inference import RawDetections
            return RawDetections(np.zeros((1, 4), np.float32), np.zeros(1, np.int64), np.ones(1, np.float32))

    stage.detector.backend = Wrong()
    rows = stage(block.slice(0, 1)).to_pylist()
    assert rows[0]["status"] == "error" and rows[0]["error"].startswith("ModelOutputError: model emitted class index 0")


def test_decoding_ahead_of_the_device_is_bounded():
    """A GPU actor's decode threads run at most ``depth`` images ahead."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from batchdet.pipeline.stages import _ahead

    started = []
    results = _ahead(ThreadPoolExecutor(2), lambda x: started.append(x) or 2 * x, list(range(20)), depth=3)
    first = next(results)
    time.sleep(0.2)
    assert len(started) == 4  # the one taken and three ahead, however long the consumer waits
    assert [first, *results] == [2 * x for x in range(20)]


@pytest.mark.parametrize("cached", [False, True])
def test_an_actor_starts_without_importing_onnx(narrow_model, tmp_path, cached):
    """``import onnx`` costs ~1 s (ml_dtypes) in every actor as it starts; the
    driver has checked the model, so the actor only hashes it, and builds
    its session from the file itself, cached or not."""
    import os
    import subprocess
    import sys

    code = ("import sys; from batchdet.pipeline.stages import InferenceStage; "
            f"s = InferenceStage({str(narrow_model)!r}, 'r'); "
            "print(s.detector.backend.load_source, 'onnx' in sys.modules)")
    env = dict(os.environ, BATCHDET_ORT_CACHE=str(tmp_path / "ort") if cached else "0")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
            for _ in range(2 if cached else 1)]
    expected = [["cache-miss", "False"], ["cache-hit", "False"]] if cached else [["uncached", "False"]]
    assert runs == expected

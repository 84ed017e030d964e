"""The OpenVINO engine (`--engine openvino`; what `--precision bf16` runs on):
FP32 here, where the CPU has no bf16, against onnxruntime on identical input
tensors; through Detector and a whole run; its speed-up measured once per
CPU; and the bf16 refusal on a CPU without bf16, before any work."""

from __future__ import annotations

import ctypes
import functools
import json
import locale

import numpy as np
import onnx
import pytest
from onnx import helper

from batchdet import api
from batchdet.cli import main
from batchdet.cpu import present
from batchdet.options import BF16, FP32, ONNXRUNTIME, OPENVINO
from batchdet.pipeline import precision
from batchdet.pipeline.openvino_engine import _StackT
from batchdet.pipeline.detector import Detector
from batchdet.pipeline.inference import OnnxBackend
from batchdet.pipeline.openvino_engine import OpenVinoBackend
from batchdet.pipeline.precision import Choice
from batchdet.pipeline.preprocess import prepare
from batchdet.pipeline.speedup import Speedup, cache_path, measure_once, time_interleaved
from batchdet.pipeline.inference import OUTPUTS
from helpers.benchmarks import script
from helpers.photos import photo, photo_path

agreement = script("precision").agreement  # the benchmark's measure of agreement

PHOTOS = ("rocket.jpg", "chelsea.png", "astronaut.png")
#: the stand-in's tensors before NMS (batchdet.model.standin_graph.build_postprocess)
PRE_NMS = ("postprocess.boxes", "postprocess.softmax")


@pytest.fixture(scope="module")
def with_pre_nms(narrow_model, tmp_path_factory):
    """The narrow stand-in with its decoded boxes and class probabilities as outputs too."""
    model = onnx.load(str(narrow_model))
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in PRE_NMS)
    path = tmp_path_factory.mktemp("pre-nms") / "narrow-pre-nms.onnx"
    onnx.save(model, str(path))
    return path


def test_openvino_fp32_computes_what_onnxruntime_computes(with_pre_nms):
    """Same float tensor in, both engines: the tensors before NMS agree to float
    rounding, and so do the detections NMS makes of them. (Compared on identical
    inputs, since the random stand-in is chaotic in its input: docs/model.md.)"""
    ort, ov = OnnxBackend(with_pre_nms, threads=2).load(), OpenVinoBackend(with_pre_nms, threads=2).load()
    for name in PHOTOS:
        x = prepare(photo(name)).tensor
        mine, theirs = ov.run(x), ort.run(x)
        assert set(mine) == set(theirs) == {"bboxes", "labels", "scores", *PRE_NMS}
        boxes, probs = (theirs[n] for n in PRE_NMS)
        assert boxes.shape == (1, 15130, 4) and probs.shape == (1, 81, 15130)
        np.testing.assert_allclose(mine["postprocess.boxes"], boxes, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mine["postprocess.softmax"], probs, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)  # they are probabilities
        # every onnxruntime detection found by OpenVINO: same label, IoU >= 0.99, score within 1e-4
        assert len(theirs["scores"][0]) == len(mine["scores"][0]) > 100
        found = agreement({k: theirs[k][0] for k in OUTPUTS}, {k: mine[k][0] for k in OUTPUTS}, 0.0, 0.99)
        assert found["matched"] >= 0.98 * found["wanted"] and found["max_score_diff"] <= 1e-4, (name, found)


def test_detector_on_openvino(narrow_model):
    """Detector with the OpenVINO choice: detections in pixels of the original,
    the scores of OpenVINO's own outputs, and the same as onnxruntime's to rounding."""
    ov = Detector(narrow_model, threads=2, choice=Choice(OPENVINO, FP32))
    ort = Detector(narrow_model, threads=2)
    assert (ov.backend.name, ort.backend.name) == ("openvino", "onnxruntime")
    found, reference = ov.detect(photo("rocket.jpg")), ort.detect(photo("rocket.jpg"))
    assert (found.width, found.height) == (640, 427)
    top = lambda r: [(d["label"], round(d["score"], 3)) for d in r.detections[:20]]  # noqa: E731
    assert top(found) == top(reference) and len(found.detections) > 20


def test_the_backend_refuses_bf16_on_a_cpu_without_it(narrow_model, monkeypatch):
    """Each actor checks its own node's CPU (a cluster's need not be the driver's)."""
    monkeypatch.setattr("batchdet.pipeline.openvino_engine.present",
                        lambda wanted, text=None: present(wanted, "flags\t: avx2 fma\n"))
    with pytest.raises(ValueError, match="needs a CPU with AVX512_BF16 or AMX-BF16"):
        OpenVinoBackend(narrow_model, 1, BF16).load()
    with pytest.raises(ValueError, match="must be one of"):
        OpenVinoBackend(narrow_model, 1, "fp16")


class _Clock:
    """A backend whose predict takes ``seconds`` (a sleep): timing arithmetic without a model."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def predict(self, image):
        import time

        self.calls += 1
        time.sleep(self.seconds)


def test_time_interleaved_runs_each_once_untimed_then_alternately():
    slow, fast = _Clock(0.02), _Clock(0.005)
    t_slow, t_fast = time_interleaved([slow, fast], [np.zeros(1)] * 3, rounds=2)
    assert slow.calls == fast.calls == 1 + 3 * 2 and len(t_slow) == len(t_fast) == 3 * 2
    assert all(0.02 <= t < 0.05 for t in t_slow) and all(0.005 <= t < 0.02 for t in t_fast)
    assert len(time_interleaved([slow], [np.zeros(1)], rounds=1, warm=False)[0]) == 1 and slow.calls == 8
    with pytest.raises(ValueError, match="no image"):
        time_interleaved([slow], [], 1)


def test_speedup_is_measured_once_per_cpu_then_remembered(narrow_model, tmp_path):
    """OpenVINO FP32 stands in for bf16 here: measured on the run's first
    readable images, kept in the cache, read back the second time."""
    uris = [str(tmp_path / "missing.jpg"), *(str(photo_path(n)) for n in PHOTOS)]
    choice = Choice(OPENVINO, FP32)
    first, measured = measure_once(choice, str(narrow_model), "ab" * 32, uris, cache_dir=tmp_path / "c", threads=2)
    assert measured and isinstance(first, Speedup)
    assert first.images == 2 and first.rounds == 2 and first.threads == 2  # the unreadable one left out
    assert first.engine.startswith("openvino 2") and first.engine.endswith(" fp32")
    assert first.baseline.startswith("onnxruntime ") and first.baseline.endswith(" fp32")
    assert first.factor == pytest.approx(first.baseline_s_per_image / first.s_per_image)
    assert f"x{first.factor:.2f}" in first.to_text() and "interleaved" in first.to_text()
    (kept,) = (tmp_path / "c").iterdir()
    assert json.loads(kept.read_text()) == first.to_dict()

    again, measured = measure_once(choice, str(narrow_model), "ab" * 32, uris, cache_dir=tmp_path / "c", threads=2)
    assert (again, measured) == (first, False)
    other, measured = measure_once(choice, str(narrow_model), "cd" * 32, uris, cache_dir=tmp_path / "c", threads=1)
    assert measured and other.threads == 1 and len(list((tmp_path / "c").iterdir())) == 2  # another model
    kept.write_text("{")  # truncated: measured again, not an error
    assert measure_once(choice, str(narrow_model), "ab" * 32, uris, cache_dir=tmp_path / "c", threads=2)[1]
    assert measure_once(choice, str(narrow_model), "ef" * 32, [str(tmp_path / "none.jpg")],
                        cache_dir=tmp_path / "c") == (None, False)
    odd = cache_path("ab" * 32, "openvino 2026.4.1-1/releases/2026 bf16", "onnxruntime 1.32.0 fp32", 2, tmp_path)
    assert odd.parent == tmp_path and odd.name.startswith("abababababababababababab-openvino_2026.4.1-1_releases_")


def _signal_stack() -> tuple[int | None, int, int]:
    """This thread's alternate signal stack: (address, size, flags)."""
    stack = _StackT()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack))
    return stack.ss_sp, stack.ss_size, stack.ss_flags


def test_a_run_on_openvino_records_it_and_prints_its_speedup_once(narrow_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no measurement of another test's
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes(photo(name))
    caller_locale, caller_stack = locale.setlocale(locale.LC_ALL), _signal_stack()
    # in-process: the speed-up is measured and remembered before either engine runs (each engine's
    # OpenVINO sessions: test_each_execution_runs_openvino_in_its_sessions); with "auto", the
    # session's Ray, once started, would make these three runs three Ray runs
    detect = functools.partial(api.detect, {"x": str(folder)}, model=narrow_model, execution="in-process")
    first = detect(str(tmp_path / "a"), engine=OPENVINO)
    assert locale.setlocale(locale.LC_ALL) == caller_locale  # OpenVINO's loads on two threads left it "C"
    # OpenVINO's compile (the speed-up is timed on this thread) left it at memory it later freed: the
    # suite's next Ctrl-C test died of SIGSEGV
    assert _signal_stack() == caller_stack
    assert first.settings["engine"] == OPENVINO and first.settings["precision"] == FP32
    assert first.engine["name"] == OPENVINO and first.engine["version"] == precision.openvino_version()
    assert first.engine["speedup_measured"] is True and "speed: measured on this CPU" in first.to_text()
    assert first.versions["openvino"] == precision.openvino_version()
    manifest = json.loads(next((tmp_path / "a" / "_runs").glob("*.json")).read_text())
    assert manifest["engine"]["speedup"]["images"] == 2 and manifest["settings"]["engine"] == OPENVINO

    second = detect(str(tmp_path / "b"), engine=OPENVINO)
    assert second.engine["speedup_measured"] is False and second.engine["speedup"] == first.engine["speedup"]
    assert "speed:" not in second.to_text() and "engine: openvino" in second.to_text()

    plain = detect(str(tmp_path / "c"))
    assert plain.engine == {"name": ONNXRUNTIME, "precision": FP32, "version": plain.versions["onnxruntime"]}
    assert plain.settings["engine"] == ONNXRUNTIME and "speed:" not in plain.to_text()


def test_bf16_on_a_cpu_without_it_is_refused_in_one_line_before_any_work(narrow_model, tmp_path, capsys,
                                                                          monkeypatch):
    started = []
    monkeypatch.setattr(api, "ray_session", lambda *a, **k: started.append(a))  # would be entered, never is
    monkeypatch.setattr(precision, "present", lambda wanted, text=None: present(wanted, "flags\t: avx avx2 fma\n"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo("rocket.jpg"))
    out = tmp_path / "out"
    argv = ["detect", "--dataset", f"x={folder}", "--output", str(out), "--model", str(narrow_model),
            "--execution", "ray", "--precision", "bf16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchdet: error: --precision bf16 needs a CPU with AVX512_BF16 or AMX-BF16") and \
        err.count("\n") == 1
    assert not out.exists() and not started  # nothing written, no Ray started


def test_each_execution_runs_openvino_in_its_sessions(ray_local, narrow_model, tmp_path, execution):
    """The plan's choice reaches the actors (Ray) and the in-process sessions: the
    rows are OpenVINO's own scores, bit for bit, which differ from onnxruntime's in
    their last bits."""
    from batchdet.output.query import query

    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes(photo(name))
    result = api.detect({"x": str(folder)}, str(tmp_path / "out"), model=narrow_model, engine=OPENVINO,
                        execution=execution, threads_per_actor=1)
    assert result.execution == execution and result.settings["engine"] == OPENVINO
    rows = {r["uri"]: r for r in query(str(tmp_path / "out"), "SELECT uri, detections FROM images").to_pylist()}
    scores = lambda detections: [d["score"] for d in detections]  # noqa: E731
    openvino = Detector(narrow_model, threads=1, choice=Choice(OPENVINO, FP32))
    onnxruntime = Detector(narrow_model, threads=1)
    differ = 0
    for name in PHOTOS:
        stored = scores(rows[str(folder / name)]["detections"])
        assert stored == scores(openvino.detect(photo(name)).detections)
        differ += stored != scores(onnxruntime.detect(photo(name)).detections)
    assert differ  # so the equality above tells the engines apart

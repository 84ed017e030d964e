"""The onnxruntime backend: provider selection (pure, no GPU needed), session
options and the optimized-model cache."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from batchdet.pipeline.inference import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxBackend,
    optimized_cache_dir,
    optimized_cache_path,
    provider_options,
    select_providers,
    session_options,
)
from batchdet.pipeline.preprocess import to_input
from helpers import tiny_model

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


# --- providers -------------------------------------------------------------------
@pytest.mark.parametrize("available", [[CPU], [CUDA, CPU], GPU_BUILD])
def test_no_gpu_asked_means_cpu_only(available):
    assert select_providers(0, available) == [CPU]
    assert select_providers(0.0, available, tensorrt=True) == [CPU]


def test_gpu_asked_on_a_cpu_build_is_refused():
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        select_providers(1, [CPU, "AzureExecutionProvider"])


def test_gpu_order_tensorrt_first_when_present():
    assert select_providers(1, GPU_BUILD) == [TENSORRT, CUDA, CPU]
    assert select_providers(0.5, GPU_BUILD, tensorrt=False) == [CUDA, CPU]
    assert select_providers(1, [CUDA, CPU]) == [CUDA, CPU]  # no TensorRT in the build: CUDA
    assert select_providers(1, [CPU, CUDA]) == [CUDA, CPU]  # the build's order does not matter


def test_provider_options(tmp_path):
    trt, cuda, cpu = provider_options([TENSORRT, CUDA, CPU], fp16=True, cache_dir=tmp_path)
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"].startswith(str(tmp_path))
    assert cuda["device_id"] == 0 and cpu == {}
    (cuda_only, _) = provider_options([CUDA, CPU], fp16=True)
    assert "trt_fp16_enable" not in cuda_only
    (trt32, _, _) = provider_options([TENSORRT, CUDA, CPU])
    assert trt32["trt_fp16_enable"] is False and "trt_engine_cache_path" not in trt32


def test_environment_switches_reach_provider_choice(monkeypatch):
    from batchdet.pipeline import inference

    monkeypatch.setenv(inference.ENV_TENSORRT, "0")
    assert not inference._env_flag(inference.ENV_TENSORRT, True)
    monkeypatch.setenv(inference.ENV_TENSORRT, "")
    assert inference._env_flag(inference.ENV_TENSORRT, True)
    monkeypatch.setenv(inference.ENV_FP16, "yes")
    assert inference._env_flag(inference.ENV_FP16, False)


# --- session options ----------------------------------------------------------------
def test_session_options_defaults_and_switches():
    o = session_options(2)
    assert o.intra_op_num_threads == 2 and o.inter_op_num_threads == 1
    assert o.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert o.enable_cpu_mem_arena and o.enable_mem_pattern
    o = session_options(1, level="extended", spinning=False, arena=False, mem_pattern=False)
    assert o.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert o.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert not o.enable_cpu_mem_arena and not o.enable_mem_pattern
    assert session_options(2, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"


# --- optimized-model cache ---------------------------------------------------------------
@pytest.fixture(params=["oracle", "standin-opset10"])
def model(request, tmp_path):
    """The tiny oracle (opset 13), and the narrow stand-in at the official file's opset 10, whose
    graph onnxruntime optimises differently (fewer fusions below opset 11)."""
    if request.param == "oracle":
        return tiny_model.write(tmp_path / "tiny.onnx")
    model = request.getfixturevalue("narrow_model")
    assert onnx.load(str(model)).opset_import[0].version == 10
    return model


def _image():
    rgb = np.zeros((1200, 1200, 3), np.uint8)
    rgb[100:300, 200:500] = 255
    return to_input(rgb)


def test_cache_key_carries_everything_that_changes_the_graph(tmp_path):
    a = optimized_cache_path(tmp_path, "ab" * 32, "1.2.3")
    assert a.parent == tmp_path and a.name.startswith("ab" * 12) and "ort1.2.3" in a.name
    assert "-all-" in a.name and "cpu" in a.name
    assert optimized_cache_path(tmp_path, "ab" * 32, "1.2.3", level="extended") != a
    assert optimized_cache_path(tmp_path, "ab" * 32, "1.2.4") != a
    assert optimized_cache_path(tmp_path, "cd" * 32, "1.2.3") != a


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHDET_ORT_CACHE", "off")
    assert optimized_cache_dir() is None
    monkeypatch.setenv("BATCHDET_ORT_CACHE", str(tmp_path))
    assert optimized_cache_dir() == tmp_path
    monkeypatch.delenv("BATCHDET_ORT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert optimized_cache_dir() == tmp_path / "batchdet" / "ort-optimized"


def test_cache_miss_then_hit_give_the_same_outputs(monkeypatch, tmp_path, model):
    monkeypatch.setenv("BATCHDET_ORT_CACHE", str(tmp_path / "cache"))
    first = OnnxBackend(model, threads=1).load()
    assert first.load_source == "cache-miss"
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary file left behind
    second = OnnxBackend(model, threads=1).load()
    assert second.load_source == "cache-hit"
    monkeypatch.setenv("BATCHDET_ORT_CACHE", "0")
    plain = OnnxBackend(model, threads=1).load()
    assert plain.load_source == "uncached"
    outs = [b.predict(_image()) for b in (first, second, plain)]
    assert len(outs[0].scores) > 0
    for o in outs[1:]:
        np.testing.assert_array_equal(o.bboxes, outs[0].bboxes)
        np.testing.assert_array_equal(o.scores, outs[0].scores)
        np.testing.assert_array_equal(o.labels, outs[0].labels)


def test_corrupt_cache_file_is_rebuilt(monkeypatch, tmp_path, model):
    monkeypatch.setenv("BATCHDET_ORT_CACHE", str(tmp_path / "cache"))
    first = OnnxBackend(model, threads=1).load()
    (cached,) = (tmp_path / "cache").glob("*.onnx")
    cached.write_bytes(b"garbage")
    again = OnnxBackend(model, threads=1).load()
    assert again.load_source == "cache-miss"
    np.testing.assert_array_equal(again.predict(_image()).scores, first.predict(_image()).scores)


def test_the_graph_takes_one_image_at_a_time(narrow_model):
    """Why ``--batch-size`` groups images into blocks but each runs alone:
    the graph (the stand-in is built as the MLPerf file is exported) fixes
    its batch axis to 1, and even with that axis made symbolic its own heads
    reshape to batch 1 (and its one TopK over all NMS selections would mix
    the images of a batch), so a batch of two cannot run."""
    two = np.zeros((2, 3, 1200, 1200), np.float32)
    session = ort.InferenceSession(str(narrow_model), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="index: 0 Got: 2 Expected: 1"):
        session.run(None, {"image": two})
    model = onnx.load(str(narrow_model))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failure below is the point; keep its log line off the output
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Reshape node"):
        session.run(None, {"image": two})

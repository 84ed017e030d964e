"""The model gate: conforming files pass, anything else is refused with one line."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from batchdet.cli import main
from batchdet.model.spec import ModelError, check_model
from helpers import tiny_model


def _model(input_name="image", dtype=TensorProto.FLOAT, shape=(1, 3, 1200, 1200), outputs=("bboxes", "labels", "scores")):
    nodes = [helper.make_node("Identity", [input_name], ["passthrough"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(input_name, dtype, list(shape))],
        [helper.make_tensor_value_info("passthrough", dtype, list(shape))]
        + [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N"]) for o in outputs],
    )
    return helper.make_model(graph)


@pytest.fixture
def tiny(tmp_path):
    return tiny_model.write(tmp_path / "tiny.onnx")


def test_conforming_model_described(tiny):
    info = check_model(tiny)
    assert info.input_shape == (1, 3, 1200, 1200)
    assert set(info.outputs) == {"bboxes", "labels", "scores"}
    assert not info.official and "unofficial" in info.kind
    assert len(info.sha256) == 64


@pytest.mark.parametrize(
    "model, message",
    [
        (_model(input_name="input"), "must be one tensor named 'image'"),
        (_model(dtype=TensorProto.UINT8), "must be float32"),
        (_model(shape=(3, 1200, 1200)), "must have rank 4"),
        (_model(shape=(1, 3, 300, 300)), "axis H is 300"),
        (_model(outputs=("bboxes", "scores")), "lacks output(s) ['labels']"),
    ],
    ids=["name", "dtype", "rank", "size", "output"],
)
def test_non_conforming_models_refused(tmp_path, model, message):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError) as e:
        check_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_not_onnx_truncated_and_missing(tmp_path, tiny):
    text = tmp_path / "notes.onnx"
    text.write_text("hello, this is text")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    for path in (text, cut):
        with pytest.raises(ModelError, match="not a valid ONNX file"):
            check_model(path)
    with pytest.raises(ModelError, match="not found"):
        check_model(tmp_path / "absent.onnx")


def test_model_info_cli(tiny, capsys):
    assert main(["model", "info", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "official:    no" in out and "output:      bboxes" in out and check_model(tiny).sha256 in out
    assert "\nopset:       13\n" in out  # the oracle's, read from the file
    assert main(["model", "info", "/nonexistent.onnx"]) == 2
    assert "batchdet: error: model file not found" in capsys.readouterr().err

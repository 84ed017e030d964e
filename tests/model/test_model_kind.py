"""What a model is — official, INT8 copy of the official, stand-in, other
conforming model — as ``batchdet model info``, the end of ``detect``/``demo``
and the run manifest's ``kind`` say it. Each kind is a tiny model (the test
oracle) carrying the metadata batchdet writes; the official one is played by
making its sha256 the official sha256."""

from __future__ import annotations

import onnx
import pytest

from batchdet.cli import STANDIN_WARNING, _print_result, main
from batchdet.files import sha256_of_file
from batchdet.model import spec
from batchdet.model.spec import KIND_KEY, OFFICIAL_SHA256, QUANTIZED_KEY, SOURCE_SHA_KEY, STANDIN_KEY, check_model
from batchdet.model.spec import kind_id_from_text
from batchdet.output.manifest import DatasetCounts, RunResult
from helpers import tiny_model

OTHER_TEXT = "other conforming model (unofficial file: meets the interface, accuracy unknown)"
STANDIN_TEXT = "STAND-IN (random weights: detections are meaningless)"
INT8_OFFICIAL_TEXT = "INT8 copy of the official MLPerf weights (accuracy: check it with `batchdet eval`)"
QUANTIZED = {QUANTIZED_KEY: "int8 static QDQ per-channel (Conv+Relu+MaxPool), activations uint8, weights int8"}

#: name: (metadata, kind_id, kind text)
KINDS = {
    "other (fine-tuned, or the test oracle)": ({}, "other", OTHER_TEXT),
    "stand-in": ({KIND_KEY: "standin", "batchdet.seed": "3", "batchdet.channels_divisor": "8"}, "standin",
                 STANDIN_TEXT),
    "stand-in of an older version": ({STANDIN_KEY: "true", "batchdet.seed": "0"}, "standin", STANDIN_TEXT),
    "INT8 copy of the official": ({**QUANTIZED, SOURCE_SHA_KEY: OFFICIAL_SHA256}, "official-int8",
                                  INT8_OFFICIAL_TEXT),
    "INT8 copy of a stand-in": ({**QUANTIZED, SOURCE_SHA_KEY: "ab" * 32, KIND_KEY: "standin", STANDIN_KEY: "true"},
                                "standin", "STAND-IN, INT8 copy (random weights: detections are meaningless)"),
    "INT8 copy of another model": ({**QUANTIZED, SOURCE_SHA_KEY: "cd" * 32}, "other",
                                   "other conforming model, INT8 copy (unofficial file: meets the interface, "
                                   "accuracy unknown)"),
    "another kind value": ({KIND_KEY: "finetuned"}, "other", OTHER_TEXT),
}


def _tiny(path, metadata: dict[str, str]):
    model = tiny_model.build()
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_is_told_by_model_info(name, tmp_path, capsys):
    metadata, kind_id, text = KINDS[name]
    path = _tiny(tmp_path / "m.onnx", metadata)
    info = check_model(path)
    assert (info.kind_id, info.kind, info.official, info.int8) == (kind_id, text, False, QUANTIZED_KEY in metadata)
    assert main(["model", "info", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1] == f"kind:        {text}"
    assert lines[2] == "official:    no"
    assert lines[3] == f"sha256:      {info.sha256}"
    if QUANTIZED_KEY in metadata:
        official = " (the official file)" if kind_id == "official-int8" else ""
        assert lines[4] == f"quantized:   by batchdet from sha256 {metadata[SOURCE_SHA_KEY]}{official}"
    else:
        assert lines[4].startswith("size:")
    assert out.endswith(STANDIN_WARNING + "\n") == (kind_id == "standin")
    assert ("STAND-IN MODEL" in out) == (kind_id == "standin")


@pytest.mark.parametrize("metadata", [{}, {KIND_KEY: "standin", STANDIN_KEY: "true"}])
def test_the_official_file_is_told_by_its_sha256_alone(metadata, tmp_path, monkeypatch, capsys):
    path = _tiny(tmp_path / "official.onnx", metadata)
    monkeypatch.setattr(spec, "OFFICIAL_SHA256", sha256_of_file(path))
    info = check_model(path)
    assert (info.kind_id, info.kind, info.official) == ("official", "official MLPerf weights", True)
    assert main(["model", "info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["kind:        official MLPerf weights", "official:    yes"]
    assert not any("STAND-IN" in line for line in lines)


def test_the_narrow_stand_in_is_a_stand_in(narrow_model, capsys):
    """The suite's stand-in, at the official file's lowest possible opset, and ``model info`` says both."""
    info = check_model(narrow_model)
    assert (info.kind_id, info.metadata[KIND_KEY], info.metadata["batchdet.channels_divisor"]) == ("standin",
                                                                                                  "standin", "8")
    assert info.opset == onnx.load(str(narrow_model)).opset_import[0].version == 10
    assert main(["model", "info", str(narrow_model)]) == 0
    out = capsys.readouterr().out
    assert "\nopset:       10\n" in out and out.endswith(STANDIN_WARNING + "\n")


def _result(kind: str | None, official: bool = False) -> RunResult:
    model = {"path": "/models/m.onnx", "sha256": "0123456789abcdef" * 4, "official": official}
    if kind is not None:  # as this version's manifest records it: the text and its id
        model["kind"], model["kind_id"] = kind, kind_id_from_text(kind)
    return RunResult(run_id="r1", output="/out", started="s", finished="f", wall_s=2.0, images_per_s=0.5,
                     datasets={"a": DatasetCounts("/a", images=1, images_ok=1)}, model=model, arguments={},
                     versions={})


@pytest.mark.parametrize("kind, official, banner", [
    ("official MLPerf weights", True, False),
    (INT8_OFFICIAL_TEXT, False, False),
    (OTHER_TEXT, False, False),
    (STANDIN_TEXT, False, True),
    ("STAND-IN, INT8 copy (random weights: detections are meaningless)", False, True),
    ("unofficial model (meets the interface; accuracy unknown)", False, False),  # an older version's manifest
    (None, False, False),
])
def test_detect_and_demo_end_with_one_honest_line_and_the_banner_only_for_stand_ins(kind, official, banner, capsys):
    _print_result(_result(kind, official))
    out = capsys.readouterr().out
    model_line = f"  model: {kind or 'kind not recorded'}, sha256 0123456789ab"
    if banner:
        assert out == _result(kind).to_text() + "\n" + STANDIN_WARNING + "\n"
    else:
        assert out == _result(kind).to_text() + "\n" and "STAND-IN" not in out
    assert out.splitlines()[-1 - 2 * banner] == model_line


@pytest.mark.parametrize("text, kind_id", [
    *[(t, k) for k, t in spec.KIND_TEXT.items()],
    *[(t, k) for k, t in spec.KIND_TEXT_INT8.items()],
    ("unofficial model (meets the interface; accuracy unknown)", "other"),  # older manifests
    ("something else", None),
    ("", None),
    (None, None),
])
def test_kind_text_back_to_its_id(text, kind_id):
    assert kind_id_from_text(text) == kind_id


def test_demo_uses_a_stand_in_only_when_the_file_is_one(narrow_model, tmp_path):
    """demo prints the stand-in banner whenever the model is not the official file,
    so the file it falls back to must be a stand-in: anything else there is rebuilt."""
    from batchdet.demo import _is_standin

    assert _is_standin(narrow_model)
    assert _is_standin(_tiny(tmp_path / "old.onnx", {STANDIN_KEY: "true"}))
    assert not _is_standin(_tiny(tmp_path / "other.onnx", {}))
    assert not _is_standin(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    assert not _is_standin(tmp_path / "broken.onnx")

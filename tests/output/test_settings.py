"""A run's result settings (what its rows depend on besides the images) and the
manifest's engine: engine and precision are part of them, and records written
before batchdet had them read as onnxruntime at fp32."""

from __future__ import annotations

from batchdet.output.manifest import RunResult
from batchdet.output.settings import ResultSettings

SHA = "ab" * 32


def test_records_without_engine_or_precision_read_as_onnxruntime_fp32():
    before_settings = ResultSettings.from_record({"model": {"sha256": SHA}, "arguments": {"score_threshold": 0.05}})
    assert (before_settings.engine, before_settings.precision, before_settings.preprocessing) == ("onnxruntime", "fp32", 1)
    before_engine = ResultSettings.from_record(
        {"settings": {"model_sha256": SHA, "score_threshold": 0.05, "max_pixels": 10, "preprocessing": 1}})
    assert before_engine == ResultSettings(SHA, 0.05, 10, 1, "onnxruntime", "fp32")
    now = ResultSettings(SHA, 0.05, 10, engine="openvino", precision="bf16")
    assert ResultSettings.from_record({"settings": now.to_dict()}) == now


def test_engine_and_precision_differences_are_named():
    theirs = ResultSettings(SHA, 0.05, 10)
    assert ResultSettings(SHA, 0.05, 10, engine="openvino", precision="bf16").differences(theirs) == [
        "--engine openvino (the output's: onnxruntime)", "--precision bf16 (the output's: fp32)"]
    assert ResultSettings(SHA, 0.05, 10, precision="int8").differences(theirs) == [
        "--precision int8 (the output's: fp32)"]
    assert ResultSettings(SHA, 0.05, 10).differences(theirs) == []


def test_the_manifest_keeps_the_engine_and_prints_a_fresh_speedup_only():
    speedup = {"speedup": {"images": 2}, "speedup_text": "measured on this CPU (...): x2.10"}
    d = {"run_id": "r", "model": {"sha256": SHA, "kind": "STAND-IN"},
         "engine": {"name": "openvino", "version": "2026.4.1", "precision": "bf16", **speedup,
                    "speedup_measured": True}}
    fresh = RunResult.from_dict(d)
    assert fresh.engine == d["engine"]
    assert "  engine: openvino 2026.4.1, precision bf16" in fresh.to_text().splitlines()
    assert "  speed: measured on this CPU (...): x2.10" in fresh.to_text().splitlines()
    remembered = RunResult.from_dict({**d, "engine": {**d["engine"], "speedup_measured": False}})
    assert "speed:" not in remembered.to_text() and "engine: openvino" in remembered.to_text()
    old = RunResult.from_dict({"run_id": "r", "model": {"sha256": SHA}})  # before batchdet recorded it
    assert old.engine == {} and "engine:" not in old.to_text()

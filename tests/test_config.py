"""Job spec YAML (batchdet/config.py): loading, refusing bad files with one line
naming the key, and `batchdet detect --config` where flags override the file."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest

from batchdet import api
from batchdet.cli import build_parser, main
from batchdet.config import (
    DESTS, SCHEMA, ConfigError, apply_config, config_from_args, dump_config, load_config, parse_config, read_config,
)

REPO = Path(__file__).resolve().parents[1]
SHA = "b417a8186967f1e78670b0075aa72a10e5c7d1a6d5c08af9d13dc97f3d29ef0d"

FULL = f"""
datasets:
  coco-val2017: s3://bucket/coco/val2017/
  shop: /data/shop/*.jpg
output: s3://bucket/out/
model: s3://bucket/models/resnet34-ssd1200.onnx
model_sha256: {SHA.upper()}
score_threshold: 0.3
actors: "2:8"
threads_per_actor: 4
gpus_per_actor: 0.5
batch_size: 8
max_pixels: 50000000
rows_per_file: 128
resume: true
storage_options:
  endpoint_url: http://127.0.0.1:9000
  anon: false
  max_concurrency: 4
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_full_spec_gives_detect_kwargs(tmp_path):
    kwargs = load_config(write(tmp_path, FULL))
    assert kwargs == {
        "datasets": {"coco-val2017": "s3://bucket/coco/val2017/", "shop": "/data/shop/*.jpg"},
        "output": "s3://bucket/out/",
        "model": f"s3://bucket/models/resnet34-ssd1200.onnx#sha256={SHA}",
        "score_threshold": 0.3, "actors": (2, 8), "threads_per_actor": 4, "gpus_per_actor": 0.5,
        "batch_size": 8, "max_pixels": 50_000_000, "rows_per_file": 128, "resume": True,
        "storage_options": {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "max_concurrency": "4"},
    }
    inspect.signature(api.detect).bind(**kwargs)  # exactly detect's keyword arguments


def test_schema_matches_detect_and_its_flags():
    params = set(inspect.signature(api.detect).parameters)
    assert set(SCHEMA) - {"model_sha256"} <= params
    detect_parser = build_parser()._subparsers._group_actions[0].choices["detect"]
    dests = {a.dest for a in detect_parser._actions}
    assert {DESTS.get(k, k) for k in SCHEMA if k != "model_sha256"} <= dests


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    kwargs = load_config(path)
    assert kwargs["datasets"] and kwargs["output"]
    inspect.signature(api.detect).bind(**kwargs)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "must be a mapping of keys"),
        ("datasets: {a: s3://b/x}\nactor: 2\n", "unknown key 'actor'; did you mean 'actors'?"),
        ("datasets: {a: s3://b/x}\nfrobnicate: 1\n", "unknown key 'frobnicate' (known keys: datasets, output"),
        ("batch_size: '4'\n", "'batch_size' must be a whole number, got text '4'"),
        ("batch_size: 4.5\n", "'batch_size' must be a whole number, got a number 4.5"),
        ("batch_size: true\n", "'batch_size' must be a whole number, got true/false True"),
        ("batch_size: 0\n", "'batch_size' must be >= 1, got 0"),
        ("resume: yes-please\n", "'resume' must be true or false, got text 'yes-please'"),
        ("score_threshold: 2\n", "'score_threshold' must be within [0, 1], got 2"),
        ("gpus_per_actor: -1\n", "'gpus_per_actor' must be >= 0"),
        ("output: ['s3://a', 's3://b']\n", "'output' must be non-empty text, got a list"),
        ("datasets: [s3://b/x]\n", "'datasets' must be a non-empty mapping of NAME: URL, got a list"),
        ("datasets: {}\n", "'datasets' must be a non-empty mapping of NAME: URL"),
        ("datasets: {'bad/name': s3://b/x}\n", "'datasets': bad dataset name 'bad/name'"),
        ("datasets: {a: 5}\n", "'datasets': 'a' must be a URL (text), got a whole number 5"),
        ("actors: '3:1'\n", "'actors' must be N, \"MIN:MAX\" or [MIN, MAX]"),
        ("actors: [1, 2, 3]\n", "'actors' must be N, \"MIN:MAX\" or [MIN, MAX]"),
        ("actors: 0\n", "'actors' must be N"),
        ("storage_options: {client_kwargs: {region_name: x}}\n",
         "'storage_options': 'client_kwargs' must be text or true/false, got a mapping"),
        ("storage_options: anon\n", "'storage_options' must be a mapping of KEY: VALUE"),
        ("model_sha256: abc\nmodel: s3://b/m\n", "'model_sha256' must be 64 hexadecimal digits"),
        (f"model_sha256: {SHA}\n", "'model_sha256' needs 'model'"),
        ("datasets: {a: s3://b/x}\ndatasets: {b: s3://b/y}\n", "duplicate key 'datasets' (line 2)"),
        ("datasets: {a: s3://x, a: s3://y}\n", "duplicate key 'a' (line 1)"),
        ("datasets: {a: [unclosed\n", "not valid YAML (line 2)"),
    ],
)
def test_bad_specs_are_refused_with_one_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml: No such file"):
        read_config(tmp_path / "nope.yaml")


def test_null_values_count_as_absent():
    assert parse_config({"datasets": {"a": "s3://b/x"}, "model": None}) == {"datasets": {"a": "s3://b/x"}}


# --- batchdet detect --config --------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """batchdet.api.detect replaced: the CLI's keyword arguments, no Ray."""
    calls = []

    class Result:
        model = {"official": True}

        def to_text(self):
            return "ok"

    def fake_detect(*args, **kwargs):
        calls.append((args, kwargs))
        return Result()

    monkeypatch.setattr(api, "detect", fake_detect)
    return calls


def test_detect_config_flags_override_file(tmp_path, captured):
    path = write(tmp_path, FULL)
    assert main(["detect", "--config", str(path), "--batch-size", "2", "--actors", "3",
                 "--storage-option", "anon=true", "--model", "/models/local.onnx"]) == 0
    (args, kwargs), = captured
    assert args == ({"coco-val2017": "s3://bucket/coco/val2017/", "shop": "/data/shop/*.jpg"}, "s3://bucket/out/")
    assert kwargs["batch_size"] == 2 and kwargs["actors"] == (3, 3)  # the flags
    assert kwargs["model"] == "/models/local.onnx"  # a flag's model drops the file's pin
    assert kwargs["storage_options"] == {"endpoint_url": "http://127.0.0.1:9000", "anon": True, "max_concurrency": "4"}
    assert kwargs["threads_per_actor"] == 4 and kwargs["gpus_per_actor"] == 0.5 and kwargs["resume"] is True
    assert kwargs["score_threshold"] == 0.3 and kwargs["max_pixels"] == 50_000_000 and kwargs["rows_per_file"] == 128


def test_detect_dataset_flag_replaces_the_files_datasets(tmp_path, captured):
    path = write(tmp_path, FULL)
    assert main(["detect", "--config", str(path), "--dataset", "other=s3://b/other", "--output", "s3://b/o2"]) == 0
    (args, kwargs), = captured
    assert args == ({"other": "s3://b/other"}, "s3://b/o2")
    assert kwargs["model"].endswith(f"#sha256={SHA}")


def test_detect_without_config_keeps_its_defaults(captured):
    assert main(["detect", "--dataset", "a=s3://b/x", "--output", "s3://b/o"]) == 0
    (args, kwargs), = captured
    assert kwargs["batch_size"] is None and kwargs["score_threshold"] == 0.05 and kwargs["storage_options"] == {}
    assert kwargs["resume"] is False and kwargs["actors"] is None and kwargs["model"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["detect"], "the following arguments are required: --dataset, --output (or in a --config file)"),
        (["detect", "--dataset", "a=s3://b/x"], "required: --output (or in a --config file)"),
        (["detect", "--config", "{spec}"], "required: --output or in {spec}"),
        (["detect", "--config", "{dir}/missing.yaml"], "cannot read config"),
        (["detect", "--config", "{bad}"], "'threads_per_actor' must be a whole number"),
    ],
)
def test_detect_config_errors_are_one_line(tmp_path, capsys, captured, argv, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text("datasets: {a: s3://b/x}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: {a: s3://b/x}\noutput: s3://b/o\nthreads_per_actor: many\n")
    fill = {"spec": spec, "dir": tmp_path, "bad": bad}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchdet: error: ") and message.format(**fill) in err and "\n" not in err
    assert not captured


def test_config_round_trip(tmp_path):
    """flags → spec → YAML → spec: what `batchdet submit` ships is what was asked."""
    parser = build_parser()
    args = apply_config(parser.parse_args(["detect", "--config", str(write(tmp_path, FULL)), "--batch-size", "2"]))
    spec = config_from_args(args)
    shipped = write(tmp_path, dump_config(spec))
    again = read_config(shipped)
    assert again == spec and again["batch_size"] == 2 and again["model"].endswith(f"#sha256={SHA}")
    assert load_config(shipped)["storage_options"]["anon"] is False


def test_apply_config_rejects_keys_this_detect_lacks(tmp_path):
    ns = argparse.Namespace(dataset=["a=s3://b/x"], output="s3://b/o", config=str(write(tmp_path, "resume: true\n")))
    with pytest.raises(ConfigError, match="'resume' is not supported by this version"):
        apply_config(ns)


def test_submit_without_the_separator_says_how(capsys):
    """detect's flags given to submit without ``--`` before them: one line saying where they go."""
    with pytest.raises(SystemExit) as e:
        main(["submit", "--address", "http://127.0.0.1:1", "--dataset", "a=s3://b/x", "--output", "s3://b/o"])
    assert e.value.code == 2
    assert "batchdet submit takes detect's arguments after --" in capsys.readouterr().err

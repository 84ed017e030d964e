"""Job spec YAML (batchdet/config.py): loading, and refusing bad files with one
line naming the key. `--config` merged with flags: tests/test_options.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchdet.config import ConfigError, load_config, parse_config, read_config
from batchdet.options import DetectOptions

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
    assert DetectOptions(**kwargs).to_spec() == kwargs  # exactly detect's keyword arguments, already normalised


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    options = DetectOptions(**load_config(path))
    assert options.datasets and options.output


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
        (f"model: s3://b/m#sha256={'0' * 64}\nmodel_sha256: {SHA}\n", "'model_sha256' {SHA} disagrees".format(SHA=SHA)),
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

"""One options type (batchdet/options.py): the Python API, the `batchdet detect`
flags, job-spec YAML and `batchdet submit` build the same DetectOptions from
the same settings, and refuse the same bad value with the same one line;
`--config FILE` merged with flags (flags win)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from batchdet import api
from batchdet.cli import build_parser, main
from batchdet.cluster.submit import job_config
from batchdet.config import ConfigError, dump_config, load_config, options_from_args, read_config
from batchdet.model.spec import ModelInfo
from batchdet.options import DetectOptions, option_names
from batchdet.pipeline.plan import RunPlan

SHA = "b417a8186967f1e78670b0075aa72a10e5c7d1a6d5c08af9d13dc97f3d29ef0d"

#: the same settings three ways: flags, a job spec, keyword arguments.
FLAGS = ["--dataset", "coco=s3://b/coco", "--dataset", "shop=/data/shop", "--output", "s3://b/out",
         "--model", f"s3://b/m.onnx#sha256={SHA}", "--score-threshold", "0.3", "--actors", "2:8",
         "--threads-per-actor", "4", "--gpus-per-actor", "0.5", "--batch-size", "8", "--rows-per-file", "128",
         "--max-pixels", "50000000", "--stall-timeout", "60", "--resume", "--execution", "ray",
         "--precision", "int8", "--engine", "openvino",
         "--storage-option", "endpoint_url=http://h:9000", "--storage-option", "anon=false"]
SPEC = {"datasets": {"coco": "s3://b/coco", "shop": "/data/shop"}, "output": "s3://b/out",
        "model": "s3://b/m.onnx", "model_sha256": SHA, "score_threshold": 0.3, "actors": [2, 8],
        "threads_per_actor": 4, "gpus_per_actor": 0.5, "batch_size": 8, "rows_per_file": 128,
        "max_pixels": 50_000_000, "stall_timeout": 60, "resume": True, "execution": "ray",
        "precision": "int8", "engine": "openvino", "storage_options": {"endpoint_url": "http://h:9000", "anon": False}}
KWARGS = {"model": f"s3://b/m.onnx#sha256={SHA}", "score_threshold": 0.3, "actors": (2, 8), "threads_per_actor": 4,
          "gpus_per_actor": 0.5, "batch_size": 8, "rows_per_file": 128, "max_pixels": 50_000_000,
          "stall_timeout": 60, "resume": True, "execution": "ray", "precision": "int8", "engine": "openvino",
          "storage_options": {"endpoint_url": "http://h:9000", "anon": False}}


@pytest.fixture
def captured(monkeypatch):
    """batchdet.api.run replaced: the options it was given, no Ray."""
    calls: list[DetectOptions] = []

    class Result:
        model = {"kind_id": "official"}

        def to_text(self):
            return "ok"

    def fake_run(options, on_progress=None, on_listing=None, ray_log=True):
        calls.append(options)
        return Result()

    monkeypatch.setattr(api, "run", fake_run)
    return calls


def spec_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


def test_flags_yaml_api_and_submit_build_equal_options(tmp_path, captured):
    spec = spec_file(tmp_path)
    assert main(["detect", *FLAGS]) == 0
    assert main(["detect", "--config", str(spec)]) == 0
    api.detect({"coco": "s3://b/coco", "shop": "/data/shop"}, "s3://b/out", **KWARGS)
    from_flags, from_yaml, from_api = captured
    assert from_flags == from_yaml == from_api == DetectOptions(**load_config(spec))
    assert DetectOptions(**job_config(["--", *FLAGS])) == from_flags  # what submit ships
    assert set(from_api.to_spec()) == set(option_names()) - {"overwrite", "address"}  # every option but those


BAD = [  # option, as typed on the command line, as a YAML/Python value, the message
    ("max_pixels", "0", 0, "'max_pixels' must be >= 1, got 0"),
    ("batch_size", "0", 0, "'batch_size' must be >= 1, got 0"),
    ("batch_size", "four", "four", "'batch_size' must be a whole number, got text 'four'"),
    ("rows_per_file", "0", 0, "'rows_per_file' must be >= 1, got 0"),
    ("threads_per_actor", "0", 0, "'threads_per_actor' must be >= 1, got 0"),
    ("score_threshold", "2", 2, "'score_threshold' must be within [0, 1], got 2"),
    ("gpus_per_actor", "-1", -1, "'gpus_per_actor' must be >= 0, got -1"),
    ("stall_timeout", "-0.5", -0.5, "'stall_timeout' must be >= 0, got -0.5"),
    ("precision", "fp16", "fp16", "'precision' must be one of 'fp32', 'bf16', 'int8', got text 'fp16'"),
    ("engine", "tensorrt", "tensorrt", "'engine' must be one of 'auto', 'onnxruntime', 'openvino', got text 'tensorrt'"),
    ("actors", "3:1", "3:1", "'actors' must be N, \"MIN:MAX\" or [MIN, MAX] (whole numbers, 1 <= MIN <= MAX), "
                             "got text '3:1'"),
]


@pytest.mark.parametrize("name, text, value, message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_values_are_refused_alike_everywhere(tmp_path, capsys, captured, name, text, value, message):
    base = {"datasets": {"a": "s3://b/x"}, "output": "s3://b/o"}
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError) as from_api:
        api.detect(base["datasets"], base["output"], **{name: value})
    assert str(from_api.value) == message

    assert main(["detect", "--dataset", "a=s3://b/x", "--output", "s3://b/o", flag, text]) == 2
    assert capsys.readouterr().err == f"batchdet: error: {message}\n"

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**base, name: value}))
    with pytest.raises(ConfigError) as from_yaml:
        load_config(spec)
    assert str(from_yaml.value) == f"{spec}: {message}"

    with pytest.raises(ValueError) as from_submit:
        job_config(["--", "--dataset", "a=s3://b/x", "--output", "s3://b/o", flag, text])
    assert str(from_submit.value) == message
    assert not captured


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "bad/name=s3://b/x"], "'datasets': bad dataset name 'bad/name'"),
    (["--dataset", "a=s3://b/x", "--dataset", "a=s3://b/y"], "dataset 'a' given twice"),
    (["--dataset", "a"], "bad --dataset 'a': expected NAME=URL"),
    (["--dataset", "a=s3://b/x", "--storage-option", "anon"], "bad --storage-option 'anon': expected KEY=VALUE"),
    (["--dataset", "a=s3://b/x", "--resume", "--overwrite"], "'resume' and 'overwrite' contradict each other"),
])
def test_bad_flags_are_one_line(capsys, captured, flags, message):
    assert main(["detect", "--output", "s3://b/o", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchdet: error: {message}") and err.count("\n") == 1
    assert not captured


def test_normalised_values():
    options = DetectOptions({"a": Path("/data/a")}, Path("/out"), model=Path("/m.onnx"), actors=[1, 3],
                            score_threshold=1, storage_options={"max_concurrency": 4, "anon": True})
    assert options.datasets == {"a": "/data/a"} and options.output == "/out" and options.model == "/m.onnx"
    assert options.actors == (1, 3) and DetectOptions({"a": "x"}, "o", actors=2).actors == (2, 2)
    assert options.score_threshold == 1.0 and isinstance(options.score_threshold, float)
    assert options.storage_options == {"max_concurrency": "4", "anon": True}  # as --storage-option gives them
    with pytest.raises(ValueError, match="'storage_options': 'client_kwargs' must be text or true/false"):
        DetectOptions({"a": "x"}, "o", storage_options={"client_kwargs": {"region_name": "x"}})
    with pytest.raises(TypeError, match="actor"):
        api.detect({"a": "x"}, "o", actor=2)  # a misspelt keyword, as with any Python function


def test_run_plan_reads_its_options_through():
    options = DetectOptions({"a": "s3://b/x"}, "s3://b/o", batch_size=4, storage_options={"secret": "s"})
    model = ModelInfo(path="/m.onnx", size=0, sha256="0" * 64, parameters=0, opset=0, input_shape=())
    plan = RunPlan(run_id="r", options=options, listings={}, model=model)
    assert plan.options.batch_size == 4 and plan.options.output == "s3://b/o" and plan.model is model
    assert pickle.loads(pickle.dumps(plan)) == plan
    with pytest.raises(AttributeError, match="nothing"):
        plan.nothing
    arguments = plan.arguments()
    assert arguments["model"] == "/m.onnx" and arguments["storage_options"] == {"secret": "***"}
    assert set(arguments) == set(option_names())


# --- batchdet detect --config FILE: defaults, then the file, then the flags given ------------------
def test_detect_config_flags_override_file(tmp_path, captured):
    assert main(["detect", "--config", str(spec_file(tmp_path)), "--batch-size", "2", "--actors", "3",
                 "--storage-option", "anon=true", "--model", "/models/local.onnx"]) == 0
    options, = captured
    assert options == replace(
        DetectOptions(**load_config(spec_file(tmp_path))), batch_size=2, actors=(3, 3),
        model="/models/local.onnx",  # a flag's model drops the file's pin
        storage_options={"endpoint_url": "http://h:9000", "anon": True},  # merged key by key
    )


def test_detect_dataset_flag_replaces_the_files_datasets(tmp_path, captured):
    assert main(["detect", "--config", str(spec_file(tmp_path)), "--dataset", "other=s3://b/other",
                 "--output", "s3://b/o2"]) == 0
    options, = captured
    assert (options.datasets, options.output) == ({"other": "s3://b/other"}, "s3://b/o2")
    assert options.model.endswith(f"#sha256={SHA}")


def test_detect_without_config_keeps_its_defaults(captured):
    assert main(["detect", "--dataset", "a=s3://b/x", "--output", "s3://b/o"]) == 0
    assert captured == [DetectOptions({"a": "s3://b/x"}, "s3://b/o")]


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
    """flags → options → YAML → options: what `batchdet submit` ships is what was asked."""
    args = build_parser().parse_args(["detect", "--config", str(spec_file(tmp_path)), "--batch-size", "2"])
    options = options_from_args(args)
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(dump_config(options.to_spec()))
    again = DetectOptions(**load_config(shipped))
    assert again == options and again.batch_size == 2 and again.model.endswith(f"#sha256={SHA}")
    assert read_config(shipped)["storage_options"]["anon"] is False


def test_submit_without_the_separator_says_how(capsys):
    """detect's flags given to submit without ``--`` before them: one line saying where they go."""
    with pytest.raises(SystemExit) as e:
        main(["submit", "--address", "http://127.0.0.1:1", "--dataset", "a=s3://b/x", "--output", "s3://b/o"])
    assert e.value.code == 2
    assert "batchdet submit takes detect's arguments after --" in capsys.readouterr().err



def test_a_folder_named_batchdet_in_the_working_directory_is_refused(tmp_path, narrow_model):
    """Ray puts the driver's working directory on its workers' path: with an
    editable install (the README's), a plain folder called ``batchdet`` there
    is imported instead of the package and every task fails. The console
    script, run there, refuses in one line before Ray starts."""
    import subprocess
    import sys

    # an editable install is found by its import hook, not on sys.path (-I: without this folder or PYTHONPATH)
    probe = "import importlib.machinery as m, sys; print(m.PathFinder.find_spec('batchdet', sys.path) is None)"
    on_path = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    if on_path.stdout.strip() != "True":
        pytest.skip("batchdet is installed as a regular package: a folder cannot shadow it")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x")
    argv = [str(Path(sys.executable).with_name("batchdet")), "detect", "--dataset", f"a={tmp_path / 'images'}",
            "--output", str(tmp_path / "out"), "--model", str(narrow_model)]
    (tmp_path / "batchdet").mkdir()
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"batchdet: error: the folder {tmp_path / 'batchdet'} would hide the batchdet package from Ray's "
        "workers (Ray puts the working directory on their path): run from another folder"], proc.stderr
    assert not (tmp_path / "out").exists()

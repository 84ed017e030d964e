"""The Ray Data job end to end: local folders and a real S3 endpoint, through
the API and the CLI, checked row by row against the single-process Detector."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from batchdet.api import detect
from batchdet.cli import main
from batchdet.pipeline.detector import Detector
from batchdet.pipeline.run import ray_console_handlers
from helpers import tiny_model
from helpers.photos import photo

# name in the dataset → bytes; the expected error kind where the file is bad
ALPHA = {
    "rocket.jpg": (photo("rocket.jpg"), None),
    "cat.png": (photo("chelsea.png"), None),
    "sub/dir/CAMERA.PNG": (photo("camera.png"), None),
    "broken.jpg": (b"<html>not an image</html>", "DecodeError"),
    "truncated.jpg": (photo("rocket.jpg")[:4000], "DecodeError"),
}
BETA = {
    "astronaut.jpeg": (photo("astronaut.png"), None),
    "coffee.webp.png": (photo("coffee.png"), None),
    "empty.jpg": (b"", "EmptyFile"),
}
SKIPPED = {"README.txt": b"not an image file"}


def write_tree(root: Path, files: dict[str, tuple[bytes, str | None]]) -> Path:
    for name, (data, _) in {**files, **{k: (v, None) for k, v in SKIPPED.items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_output(output: str, storage_options: dict | None = None) -> dict[str, dict]:
    """All rows of an output, keyed by uri (via fsspec, so local and S3 alike)."""
    from batchdet.storage import filesystem

    fs, path = filesystem(output, storage_options)
    table = pads.dataset(f"{path}", filesystem=fs, format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table()
    rows = table.to_pylist()
    assert len({r["uri"] for r in rows}) == len(rows), "duplicate rows"
    return {r["uri"]: r for r in rows}


def check_rows(rows: dict[str, dict], expected: dict[str, tuple[str, bytes, str | None]], detector: Detector, run_id: str):
    """Every listed image has exactly one row whose values equal the Detector's."""
    assert set(rows) == set(expected)
    for uri, (dataset, data, error_kind) in expected.items():
        row = rows[uri]
        assert row["dataset"] == dataset and row["run_id"] == run_id
        if error_kind:
            assert row["status"] == "error" and row["error"].startswith(f"{error_kind}: ")
            assert row["detections"] is None and row["width"] is None
            continue
        assert row["status"] == "ok" and row["error"] is None
        reference = detector.detect(data)
        assert (row["width"], row["height"]) == (reference.width, reference.height)
        assert len(row["detections"]) == len(reference.detections) > 0
        for got, want in zip(row["detections"], reference.detections):
            assert got["label_id"] == want["label_id"] and got["label"] == want["label"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            for k in ("x_min", "y_min", "x_max", "y_max"):
                assert got[k] == pytest.approx(want[k], abs=1e-2)


@pytest.fixture(scope="module")
def detector(narrow_model):
    return Detector(narrow_model, threads=2)


@pytest.fixture
def local_inputs(tmp_path):
    alpha = write_tree(tmp_path / "in" / "alpha", ALPHA)
    beta = write_tree(tmp_path / "in" / "beta", BETA)
    expected = {str(alpha / n): ("alpha", d, e) for n, (d, e) in ALPHA.items()}
    expected |= {str(beta / n): ("beta", d, e) for n, (d, e) in BETA.items()}
    return {"alpha": str(alpha), "beta": str(beta)}, expected


def test_a_process_that_calls_detect_on_ray_keeps_its_signal_handlers_and_a_quiet_stderr(ray_local, narrow_model,
                                                                                         tmp_path):
    """A fresh process (the caller, as a user's script is) sets its own SIGINT
    and SIGTERM handlers, calls ``api.detect`` on Ray, and finds both handlers
    its own afterwards (``ray.init`` sets SIGTERM and never puts it back) and
    nothing of Ray's Python logging on its stderr."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rocket.jpg").write_bytes(photo("rocket.jpg"))
    script = textwrap.dedent(f"""
        import signal
        def mine(signum, frame): pass
        signal.signal(signal.SIGINT, mine)
        signal.signal(signal.SIGTERM, mine)
        from batchdet import api
        result = api.detect({{"x": {str(tmp_path / "in")!r}}}, {str(tmp_path / "out")!r}, model={str(narrow_model)!r},
                            execution="ray")
        assert result.datasets["x"].images_ok == 1, result.datasets
        print("SIGINT", signal.getsignal(signal.SIGINT) is mine, "SIGTERM", signal.getsignal(signal.SIGTERM) is mine)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=ray_local.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "SIGINT True SIGTERM True", proc.stdout
    # only Ray's C++ core may still write here (docs/reliability.md); none of its Python loggers
    assert not [line for line in proc.stderr.splitlines() if " INFO " in line or "WARNING" in line], proc.stderr


def test_local_two_datasets_api(ray_local, narrow_model, detector, local_inputs, tmp_path, execution):
    import ray.data

    datasets, expected = local_inputs
    out = str(tmp_path / "out")
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    consoles = {h: h.stream for h in ray_console_handlers()}
    ray_log = tmp_path / "ray.log"
    result = detect(datasets, out, model=narrow_model, batch_size=2, execution=execution, ray_log=ray_log)
    assert result.execution == execution
    # Ray's and Ray Data's console lines went to the run's log, not the caller's stderr, and back after
    assert consoles and {h: h.stream for h in ray_console_handlers()} == consoles
    assert ("Data sink WriteStaging finished" in ray_log.read_text()) if execution == "ray" else not ray_log.exists()
    # the job caps the object store on its own copy of the context, not the caller's
    assert ray.data.DataContext.get_current().execution_options.resource_limits == limits
    rows = read_output(out)
    check_rows(rows, expected, detector, result.run_id)

    # the manifest, written last, agrees with the rows
    manifest = json.loads((tmp_path / "out" / "_runs" / f"{result.run_id}.json").read_text())
    assert manifest["datasets"]["alpha"]["images_ok"] == 3 and manifest["datasets"]["alpha"]["images_error"] == 2
    assert manifest["datasets"]["beta"]["images_ok"] == 2 and manifest["datasets"]["beta"]["images_error"] == 1
    assert manifest["datasets"]["alpha"]["skipped_files"] == 1
    assert manifest["datasets"]["beta"]["detections"] == sum(
        len(r["detections"] or []) for r in rows.values() if r["dataset"] == "beta"
    )
    assert manifest["model"]["sha256"] == result.model["sha256"] and manifest["model"]["official"] is False
    assert set(manifest["versions"]) >= {"batchdet", "ray", "onnxruntime"}
    assert not (tmp_path / "out" / "_staging").exists() or not any((tmp_path / "out" / "_staging").iterdir())
    assert sorted(p.parent.name for p in (tmp_path / "out").glob("dataset=*/*.parquet"))[0] == "dataset=alpha"


def test_s3_two_datasets_cli(ray_local, s3, narrow_model, detector, capsys, execution):
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    expected = {}
    for dataset, files in (("alpha", ALPHA), ("beta", BETA)):
        for name, (data, error) in {**files, **{k: (v, None) for k, v in SKIPPED.items()}}.items():
            fs.pipe(f"{bucket}/images/{dataset}/{name}", data)
            if name not in SKIPPED:
                expected[f"s3://{bucket}/images/{dataset}/{name}"] = (dataset, data, error)
    out = f"s3://{bucket}/out"
    argv = ["detect", "--dataset", f"alpha=s3://{bucket}/images/alpha", "--dataset", f"beta=s3://{bucket}/images/beta",
            "--output", out, "--model", str(narrow_model), "--actors", "1", "--threads-per-actor", "2",
            "--batch-size", "3", "--execution", execution]
    for k, v in s3.storage_options.items():
        argv += ["--storage-option", f"{k}={v}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "alpha" in printed and f"images/s ({execution})" in printed and "STAND-IN MODEL" in printed
    rows = read_output(out, s3.storage_options)
    run_id = next(iter(rows.values()))["run_id"]
    check_rows(rows, expected, detector, run_id)
    manifest = fs.cat(f"{bucket}/out/_runs/{run_id}.json").decode()
    assert '"secret": "***"' in manifest and '"key": "***"' in manifest and "testing" not in manifest


def _draw(width: int, height: int, rect: tuple[int, int, int, int], orientation: int | None = None) -> bytes:
    """A dark image with one bright rectangle, stored rotated with an EXIF tag
    when ``orientation`` is given (so only correct EXIF handling finds it)."""
    a = np.full((height, width, 3), 20, np.uint8)
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = 250
    im = Image.fromarray(a)
    buf = io.BytesIO()
    if orientation == 6:  # stored rotated 90° counter-clockwise; displays upright
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def test_pixel_space_boxes_and_label_map_through_pipeline(ray_local, tmp_path):
    """A model whose answer is computed from the input pixels: the bright
    rectangle comes back in pixels of the original (oriented) image."""
    cases = {
        "wide.png": (640, 480, (200, 100, 500, 300), None),
        "tall.png": (300, 900, (30, 600, 290, 880), None),
        "rotated.png": (640, 480, (10, 20, 330, 470), 6),
        "big.png": (2400, 1600, (1200, 400, 2000, 1500), None),
    }
    folder = tmp_path / "shapes"
    folder.mkdir()
    for name, (w, h, rect, orient) in cases.items():
        (folder / name).write_bytes(_draw(w, h, rect, orient))
    model = tiny_model.write(tmp_path / "tiny.onnx")
    detect({"shapes": str(folder)}, str(tmp_path / "out"), model=model)
    rows = read_output(str(tmp_path / "out"))
    for name, (w, h, rect, _) in cases.items():
        row = rows[str(folder / name)]
        assert (row["width"], row["height"]) == (w, h)
        got = row["detections"]
        want = tiny_model.expected(rect, w, h)
        assert [d["label_id"] for d in got] == [1, 13]  # toothbrush at 0.01 is under the threshold
        assert [d["label"] for d in got] == ["person", "stop sign"]
        for g, e in zip(got, want):
            assert g["score"] == pytest.approx(e["score"], abs=1e-6)
            # one resized pixel of tolerance in each axis, plus bilinear blur at the edge
            tol = (2 * w / 1200 + 1, 2 * h / 1200 + 1)
            box = [g["x_min"], g["y_min"], g["x_max"], g["y_max"]]
            for i, (v, ev) in enumerate(zip(box, e["box"])):
                assert abs(v - ev) <= tol[i % 2], (name, box, e["box"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "bad/name=/tmp"], "bad dataset name 'bad/name'"),
        (["--dataset", "x=/definitely/not/here"], "no such folder, prefix or file"),
        (["--dataset", "x={empty}"], "no images under"),
        (["--dataset", "x={images}", "--model", "/nope.onnx"], "model file not found"),
        (["--dataset", "x={images}", "--model", "{text}"], "not a valid ONNX file"),
        (["--dataset", "x={images}", "--output", "/proc/forbidden/out"], "cannot write to output"),
        (["--dataset", "x={images}", "--actors", "3:1"], "'actors' must be"),
        (["--dataset", "x={images}", "--dataset", "x={images}"], "given twice"),
    ],
    ids=["name", "missing", "empty", "no-model", "bad-model", "unwritable", "actors", "twice"],
)
def test_bad_arguments_fail_fast(tmp_path, narrow_model, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(photo("rocket.jpg"))
    (tmp_path / "text.onnx").write_text("not a model")
    fill = {"empty": tmp_path / "empty", "images": tmp_path / "images", "text": tmp_path / "text.onnx"}
    argv = [a.format(**fill) for a in argv]
    full = ["detect", *argv]
    if "--output" not in argv:
        full += ["--output", str(tmp_path / "out")]
    if "--model" not in argv:
        full += ["--model", str(narrow_model)]
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchdet: error: ") and message in err and "\n" not in err


def test_s3_unknown_bucket_and_missing_credentials(s3, narrow_model, tmp_path, capsys, monkeypatch):
    endpoint = ["--storage-option", f"endpoint_url={s3.endpoint_url}"]
    base = ["detect", "--output", str(tmp_path / "out"), "--model", str(narrow_model), *endpoint]
    assert main([*base, "--dataset", "x=s3://no-such-bucket-here/images"]) == 2
    assert "no-such-bucket-here" in capsys.readouterr().err
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3.new_bucket()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # the call above cached a client holding the old env's keys
    assert main([*base, "--dataset", f"x=s3://{bucket}/images"]) == 2
    assert "credentials" in capsys.readouterr().err.lower()


def test_actor_layout(ray_local, narrow_model, local_inputs, tmp_path):
    """A CPU actor defaults to one thread, one actor per CPU (a GPU actor to
    the node's CPUs, at most 4); on the embedded Ray the pool is full from the
    start, on a cluster it grows from one; given values are kept."""
    from dataclasses import replace

    from batchdet.options import DetectOptions
    from batchdet.pipeline.plan import plan_run
    from batchdet.pipeline.run import actor_layout

    datasets, _ = local_inputs
    plan = plan_run(DetectOptions({"alpha": datasets["alpha"]}, str(tmp_path / "o"), model=narrow_model))
    assert actor_layout(plan, local=True) == (1, (2, 2))  # ray_local: one 2-CPU node
    assert actor_layout(plan, local=False) == (1, (1, 2))

    def setting(plan, **changes):
        return replace(plan, options=replace(plan.options, **changes))

    two = setting(plan, threads_per_actor=2)
    assert actor_layout(two, local=True) == (2, (1, 1))
    assert actor_layout(setting(two, actors=(1, 3)), local=True) == (2, (1, 3))
    # on a cluster whose GPU nodes are still to come (a warning, not an error): threads = the node's CPUs
    assert actor_layout(setting(plan, gpus_per_actor=1.0), local=False) == (2, (1, 1))


def test_object_store_cap_and_quiet_reports_are_the_jobs_own():
    """The cap grows with the actors (never below two actors' worth) and the
    block, holds while the job runs with Ray Data's own reports off, and the
    caller's (process-global) DataContext is given back as it was."""
    import ray.data

    from batchdet.pipeline.run import PREFETCH_BLOCKS_PER_ACTOR, object_store_cap
    from batchdet.pipeline.run import job_context

    mib = 1 << 20  # a large photograph's bytes, written out independently of the code
    assert object_store_cap(1, 8) == 2 * PREFETCH_BLOCKS_PER_ACTOR * 8 * mib
    assert object_store_cap(5, 64) == 5 * PREFETCH_BLOCKS_PER_ACTOR * 64 * mib
    caller = ray.data.DataContext.get_current()
    before = caller.execution_options
    bars, plan = caller.enable_progress_bars, caller.print_on_execution_start
    with job_context(123 * mib):
        assert caller.execution_options.resource_limits.object_store_memory == 123 * mib
        assert (caller.enable_progress_bars, caller.print_on_execution_start) == (False, False)
    assert caller.execution_options is before
    assert (caller.enable_progress_bars, caller.print_on_execution_start) == (bars, plan) == (True, True)
    # a tighter limit the caller set is kept
    caller.execution_options.resource_limits = before.resource_limits.copy(object_store_memory=1e6)
    try:
        with job_context(123 * mib):
            assert caller.execution_options.resource_limits.object_store_memory == 1e6
    finally:
        caller.execution_options.resource_limits = before.resource_limits.copy(object_store_memory=None)


def test_blocks_spread_small_runs_and_amortise_large_ones():
    from batchdet.pipeline.run import BLOCKS_PER_ACTOR, MAX_BLOCK, images_per_block

    assert images_per_block(24, 2) == 3  # 8 blocks: 4 per actor
    assert images_per_block(5, 2) == 1 and images_per_block(0, 2) == 1
    assert images_per_block(100_000, 2) == MAX_BLOCK
    assert images_per_block(100_000, 2, gpus=1) == 4 * MAX_BLOCK
    for n in (1, 7, 24, 100, 1000):
        block = images_per_block(n, 3)
        assert block == MAX_BLOCK or -(-n // block) >= min(n, 3 * BLOCKS_PER_ACTOR)



def test_actor_that_no_node_can_hold_is_refused(ray_local, narrow_model, local_inputs, tmp_path, capsys):
    """On this machine's own Ray nothing will add a node: an actor needing 8
    CPUs (or a GPU) would wait forever, so the run is refused with one line."""
    datasets, _ = local_inputs
    base = ["detect", "--dataset", f"alpha={datasets['alpha']}", "--model", str(narrow_model)]
    assert main([*base, "--output", str(tmp_path / "o1"), "--threads-per-actor", "8"]) == 2
    assert "--threads-per-actor 8 exceeds the largest node's 2 CPUs" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "o2"), "--gpus-per-actor", "1"]) == 2
    assert "--gpus-per-actor 1.0 but the cluster has 0 GPUs" in capsys.readouterr().err


def test_embedded_ray_keeps_idle_workers_warm(ray_local, tmp_path):
    """Preprocessing workers survive the seconds between blocks on a node with
    more tasks in flight than CPUs. ray_local is started as batchdet starts its
    embedded Ray (``local_ray_options()``); with Ray's default settings all but
    2 (the CPUs) of these workers are killed after 1 s idle, and each later
    block pays a new worker's start."""
    import time

    import ray

    tasks = 4  # twice the CPUs

    @ray.remote(num_cpus=0.25)
    def worker_pid(barrier: str) -> int:
        # all at once, so each in a worker of its own, as when an actor's first blocks are prepared
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + 120  # new workers start slowly on a loaded machine
        while len(os.listdir(barrier)) < tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.getpid()

    pids = set(ray.get([worker_pid.remote(str(tmp_path)) for _ in range(tasks)]))
    assert len(pids) == tasks, pids
    time.sleep(3)  # a CPU actor frees a block every few seconds; Ray's default kills after 1 s idle
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids), pids

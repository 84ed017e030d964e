"""``batchdet verify`` (docs/cli.md, "verify"): a clean output passes, and each way
an output stops matching its manifests or its inputs is caught, named, and
exits 1 — a hand-edited detection, a removed data file, a changed or deleted
image, the model file swapped on disk, a file no committed run wrote.

The outputs come from real runs (the narrow smooth stand-in, whose detections
move only when something real changes; in-process or on a local Ray; locally and
on S3), tampered with as a user or a bug would: files rewritten, removed or
copied, images and the model overwritten. Expected values are computed here,
independently: sha256 with hashlib, rows with pyarrow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchdet import api
from batchdet.cli import main
from batchdet.cpu import present
from batchdet.model.standin import write_standin
from batchdet.pipeline.precision import BF16_FLAGS, openvino_version
from batchdet.verify import BOX_TOLERANCE_PX, CHECKS, REDETECT, SCORE_TOLERANCE, match_detections
from helpers.photos import photo

#: These tests are about what a run writes, the same on either engine (the
#: contract, kills and the watchdog run on both: tests parametrised over
#: ``execution``): in-process, each run takes a second, not Ray's start.
detect = functools.partial(api.detect, execution="in-process")

PHOTOS = ("rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png")
IMAGES = len(PHOTOS) + 1  # and broken.jpg


@dataclass(frozen=True)
class Made:
    """One real run's output, its inputs and its model: tests copy the output, or change and restore the rest."""

    images: Path
    out: Path
    model: Path
    run_id: str


@pytest.fixture(scope="module")
def made(tmp_path_factory, smooth_model) -> Made:
    """Four photographs and a broken file, one row per data file (so one can go
    missing alone), made with a copy of the smooth model that tests may swap."""
    root = tmp_path_factory.mktemp("verify")
    model = root / "model.onnx"
    shutil.copy(smooth_model, model)
    images = root / "in"
    images.mkdir()
    for name in PHOTOS:
        (images / name).write_bytes(photo(name))
    (images / "broken.jpg").write_bytes(b"not an image")
    result = detect({"x": str(images)}, str(root / "out"), model=str(model), rows_per_file=1, batch_size=1)
    assert len(result.files) > 1
    return Made(images, root / "out", model, result.run_id)


@pytest.fixture
def output(made, tmp_path) -> Path:
    """A copy of the module's output to tamper with (its rows name the module's images)."""
    return Path(shutil.copytree(made.out, tmp_path / "out"))


@contextmanager
def replaced(path: Path, data: bytes | None) -> Iterator[None]:
    """``path`` holds ``data`` (None: deleted) inside the block, its own bytes again after."""
    before = path.read_bytes()
    try:
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        yield
    finally:
        path.write_bytes(before)


def run_verify(capsys, out: Path | str, *flags: str) -> tuple[int, dict[str, tuple[int, int]], list[str], str]:
    """(exit status, {check: (checked, problems)}, MISMATCH lines, whole text) of the CLI."""
    code = main(["verify", str(out), *flags])
    text = capsys.readouterr().out
    table = {}
    for line in text.splitlines():
        name = next((c for c in CHECKS if line.strip().startswith(c)), None)
        if name:
            checked, problems = line.strip()[len(name):].split()
            table[name] = (int(checked.replace(",", "")), int(problems))
    assert list(table) == list(CHECKS), text
    return code, table, [line for line in text.splitlines() if line.startswith("MISMATCH ")], text


def clean(table: dict[str, tuple[int, int]], files: int, sampled: int) -> dict[str, tuple[int, int]]:
    """The table of the untouched output of :func:`made`, ``sampled`` rows re-detected."""
    return {"manifests readable": (1, 0), "data files committed": (files, 0), "row counts (run, dataset)": (1, 0),
            "one current row per image": (IMAGES, 0), "one set of result settings": (1, 0),
            "sampled bytes unchanged": (sampled, 0), "recorded model (sha256)": (1 if sampled else 0, 0),
            "sampled rows re-detected": (sampled, 0)}


def data_file_of(out: Path, uri: str) -> Path:
    """The data file holding ``uri``'s row."""
    return next(p for p in out.glob("dataset=x/*.parquet") if uri in pq.read_table(p, columns=["uri"]).column(0)
                .to_pylist())


def test_a_clean_output_passes(made, capsys):
    files = len(list(made.out.glob("dataset=x/*.parquet")))
    code, table, mismatches, text = run_verify(capsys, made.out, "--sample", "100")
    assert (code, mismatches) == (0, [])
    assert table == clean(table, files, IMAGES)
    assert text.endswith("OK: no mismatch\n")
    # a smaller sample checks that many rows; --sample 0 only the structure
    assert run_verify(capsys, made.out, "--sample", "2", "--seed", "5")[1] == clean(table, files, 2)
    assert run_verify(capsys, made.out, "--sample", "0")[1] == clean(table, files, 0)


@pytest.mark.parametrize("field, delta", [("score", 0.01), ("x_min", 3.0)])
def test_a_hand_edited_detection_is_caught(made, output, capsys, field, delta):
    uri = str(made.images / "rocket.jpg")
    path = data_file_of(output, uri)
    table = pq.ParquetFile(path).read()  # the file alone: no dataset column from its folder
    rows = table.to_pylist()
    row = next(r for r in rows if r["uri"] == uri)
    original = dict(row["detections"][0])
    row["detections"][0][field] += delta
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)

    code, checks, mismatches, _ = run_verify(capsys, output, "--sample", "100")
    assert code == 1
    assert {name: problems for name, (_, problems) in checks.items() if problems} == {REDETECT: 1}
    (line,) = mismatches
    edited = row["detections"][0]
    assert line.startswith(f"MISMATCH {uri}: 1 detection(s) differ of {len(row['detections'])} in the row: ")
    assert f"row has {edited['label']} {edited['score']:.4f} at ({edited['x_min']:.1f}" in line
    assert f"re-detection {original['label']} {original['score']:.4f} at ({original['x_min']:.1f}" in line
    assert line.endswith(f"(run {made.run_id})")


def test_a_removed_data_file_is_caught(made, output, capsys):
    uri = str(made.images / "chelsea.png")
    path = data_file_of(output, uri)
    (row,) = pq.read_table(path).to_pylist()
    path.unlink()
    code, checks, mismatches, _ = run_verify(capsys, output, "--sample", "0")
    assert code == 1
    name = f"dataset=x/{path.name}"
    assert mismatches == [
        f"MISMATCH {name}: listed in run {made.run_id}'s manifest but not there (deleted or moved)",
        f"MISMATCH _runs/{made.run_id}.json: dataset x: images {IMAGES} in the manifest, {IMAGES - 1} in its files; "
        f"images_ok {IMAGES - 1} in the manifest, {IMAGES - 2} in its files; detections "
        f"{_detections(made.out)} in the manifest, {_detections(made.out) - len(row['detections'])} in its files",
    ]
    assert checks["one current row per image"] == (IMAGES - 1, 0)


def _detections(out: Path) -> int:
    return sum(len(d or []) for d in pq.read_table(out / "dataset=x", columns=["detections"]).column(0).to_pylist())


@pytest.mark.parametrize("now", ["other bytes", "deleted"])
def test_a_changed_image_is_caught(made, capsys, now):
    image = made.images / "coffee.png"
    before = image.read_bytes()
    other = photo("camera.png")
    with replaced(image, other if now == "other bytes" else None):
        code, checks, mismatches, _ = run_verify(capsys, made.out, "--sample", "100")
    assert code == 1
    changed = (f"sha256 {hashlib.sha256(before).hexdigest()[:12]}… ({len(before):,} bytes) then, "
               f"{hashlib.sha256(other).hexdigest()[:12]}… ({len(other):,} bytes) now" if now == "other bytes"
               else "now ReadError: not found (deleted after listing?)")
    assert mismatches == [f"MISMATCH {image}: bytes changed since run {made.run_id}: {changed}"]
    assert checks["sampled bytes unchanged"] == (IMAGES, 1)
    assert checks[REDETECT] == (IMAGES - 1, 0)  # the others still re-detected, and equal


def test_a_model_swapped_on_disk_is_caught_and_a_copy_can_stand_in(made, capsys, tmp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copy(made.model, copy)
    recorded = hashlib.sha256(copy.read_bytes()).hexdigest()
    other = write_standin(tmp_path / "other.onnx", seed=1, channels_divisor=8, smooth=True).read_bytes()
    with replaced(made.model, other):
        code, checks, mismatches, _ = run_verify(capsys, made.out, "--sample", "100")
        assert code == 1
        path = made.model.resolve()
        assert mismatches == [f"MISMATCH {path}: model at {path} has sha256 {hashlib.sha256(other).hexdigest()}, "
                              f"rows were made with {recorded}"]
        assert checks["recorded model (sha256)"] == (1, 1) and checks[REDETECT] == (0, 0)
        # --model: the copy of the recorded file, by its sha256, re-detects every row
        code, checks, mismatches, _ = run_verify(capsys, made.out, "--sample", "100", "--model", str(copy))
        assert (code, mismatches, checks[REDETECT]) == (0, [], (IMAGES, 0))
        # --model with other weights is refused the same way as the recorded path
        code, _, mismatches, _ = run_verify(capsys, made.out, "--model", str(made.model))
        assert code == 1 and mismatches[0].startswith(f"MISMATCH {path}: model at {path} has sha256 ")
    with replaced(made.model, None):  # gone: named, with the way out
        code, checks, mismatches, _ = run_verify(capsys, made.out, "--sample", "1")
    assert (code, checks[REDETECT]) == (1, (0, 0))
    assert mismatches == [f"MISMATCH {path}: run {made.run_id}'s model cannot be used: ModelError: model file not "
                          f"found: {path}; pass --model PATH to a copy of it"]


def test_an_output_brought_up_to_date_passes(smooth_model, tmp_path, capsys):
    """The issue's user: change, delete and copy inputs, ``--resume``, verify. A
    second run with a ``missing`` row and a copied row adds up, and every
    current row matches the bytes now at its URI."""
    images = tmp_path / "in"
    images.mkdir()
    for name in PHOTOS[:3]:
        (images / name).write_bytes(photo(name))
    (images / "broken.jpg").write_bytes(b"not an image")
    out = str(tmp_path / "out")
    detect({"x": str(images)}, out, model=smooth_model)
    (images / PHOTOS[0]).write_bytes(photo("camera.png"))
    (images / PHOTOS[1]).unlink()
    (images / "copy.png").write_bytes(photo(PHOTOS[2]))
    second = detect({"x": str(images)}, out, model=smooth_model, resume=True)
    assert (second.datasets["x"].gone, second.datasets["x"].copied) == (1, 1)
    code, checks, mismatches, _ = run_verify(capsys, out, "--sample", "100")
    assert (code, mismatches) == (0, [])
    now = len(list(images.iterdir()))
    files = len(list((tmp_path / "out" / "dataset=x").glob("*.parquet")))  # the second run's: its missing row's too
    assert checks == {"manifests readable": (2, 0), "data files committed": (files, 0),
                      "row counts (run, dataset)": (2, 0), "one current row per image": (now, 0),
                      "one set of result settings": (2, 0), "sampled bytes unchanged": (now, 0),
                      "recorded model (sha256)": (1, 0), "sampled rows re-detected": (now, 0)}


def test_rows_are_re_detected_by_the_engine_and_precision_that_made_them(smooth_model, tmp_path, capsys):
    """An OpenVINO output is re-detected on OpenVINO and verifies clean; rows
    recorded at bf16 are re-detected at bf16, so on a CPU without it they are
    named as what cannot run here (not compared with FP32's)."""
    images = tmp_path / "in"
    images.mkdir()
    for name in PHOTOS[:3]:
        (images / name).write_bytes(photo(name))
    out = tmp_path / "out"
    run = detect({"x": str(images)}, str(out), model=smooth_model, engine="openvino")
    code, checks, mismatches, text = run_verify(capsys, out, "--sample", "100")
    assert (code, mismatches, checks[REDETECT]) == (0, [], (3, 0))
    # OpenVINO's FP32 is onnxruntime's to 1e-5, within the tolerances: only the report tells which one ran
    assert f"note: rows made by openvino at fp32 are re-detected by openvino {openvino_version()}\n" in text
    manifest = out / "_runs" / f"{run.run_id}.json"
    record = json.loads(manifest.read_text())
    record["settings"]["precision"] = "bf16"
    manifest.write_text(json.dumps(record))
    if present(BF16_FLAGS):
        return  # this CPU runs bf16: the refusal below is for CPUs without it (this project's CI)
    code, checks, mismatches, _ = run_verify(capsys, out, "--sample", "100")
    path = Path(smooth_model).resolve()
    assert code == 1 and checks[REDETECT] == (0, 0) and len(mismatches) == 1
    assert mismatches[0].startswith(f"MISMATCH {path}: run {run.run_id}'s rows were made by openvino at bf16, "
                                    "which cannot run here: ValueError: --precision bf16 needs a CPU with AVX512_BF16")


def test_a_file_no_committed_run_wrote_is_caught(made, output, capsys):
    """A run's file copied under another run's name: no manifest lists it, its rows
    are not that run's, and every image in it now has two current rows."""
    source = data_file_of(output, str(made.images / "astronaut.png"))
    stray = "20991231T000000Z-ffffff"
    shutil.copy(source, output / "dataset=x" / f"{stray}_copy.parquet")
    code, checks, mismatches, _ = run_verify(capsys, output, "--sample", "0")
    assert code == 1
    assert mismatches == [
        f"MISMATCH dataset=x/{stray}_copy.parquet: belongs to run {stray}, which has no manifest: a run committing "
        "now, or killed mid-commit (`detect --resume` commits its files)",
        f"MISMATCH dataset=x/{stray}_copy.parquet: holds 1 row(s) of run {made.run_id}, but is named as run {stray}'s",
        f"MISMATCH {made.images / 'astronaut.png'}: 2 current rows in dataset x, all of run {made.run_id}",
    ]


def test_staged_runs_and_leases_are_notes_not_mismatches(made, output, capsys):
    staged = output / "_staging" / "20991231T000000Z-eeeeee" / "dataset=x"
    staged.mkdir(parents=True)
    shutil.copy(next(output.glob("dataset=x/*.parquet")), staged / "a.parquet")
    now = datetime.now(timezone.utc).isoformat()
    holder = {"run_id": "20991231T000000Z-eeeeee", "host": "h", "pid": 1, "machine": "m", "started": now,
              "heartbeat": now}
    (output / "_lease.3.json").write_text(json.dumps(holder))
    code, checks, mismatches, text = run_verify(capsys, output, "--sample", "0")
    assert (code, mismatches) == (0, [])
    assert checks["one current row per image"] == (IMAGES, 0)  # the staged row is in no view
    assert "note: _staging/20991231T000000Z-eeeeee/: run 20991231T000000Z-eeeeee is running now or was killed" in text
    assert "note: the output's lease is held by run 20991231T000000Z-eeeeee on host h (pid 1)" in text
    (output / "_lease.3.json").write_text(json.dumps({**holder, "released": True}))  # that run ended
    assert "lease is held" not in run_verify(capsys, output, "--sample", "0")[3]


def test_rows_without_content_identity_are_unverifiable(made, output, capsys):
    """Files as an older batchdet wrote them (no size, sha256, version, copied_from):
    the structure still checks, the sampled rows are counted unverifiable, not wrong."""
    for path in output.glob("dataset=x/*.parquet"):
        table = pq.ParquetFile(path).read()
        pq.write_table(table.drop_columns(["size", "sha256", "version", "copied_from"]), path)
    code, checks, mismatches, text = run_verify(capsys, output, "--sample", "100")
    assert (code, mismatches) == (0, [])
    assert checks["sampled bytes unchanged"] == (0, 0) and checks[REDETECT] == (0, 0)
    assert (f"unverifiable: {IMAGES} sampled row(s): no content identity (sha256) recorded: written by an older "
            "batchdet") in text


def test_an_s3_output_passes(s3, smooth_model, capsys, tmp_path):
    """Images, model and output on S3: the rows' bytes and the model are read
    back through the storage options; a changed object and a swapped model are caught there too."""
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    for name in PHOTOS[:2]:
        fs.pipe_file(f"{bucket}/in/{name}", photo(name))
    fs.pipe_file(f"{bucket}/in/broken.jpg", b"not an image")
    fs.put_file(str(smooth_model), f"{bucket}/models/narrow.onnx")
    model, out = f"s3://{bucket}/models/narrow.onnx", f"s3://{bucket}/out"
    detect({"x": f"s3://{bucket}/in"}, out, model=model, storage_options=s3.storage_options)
    flags = [f for k, v in s3.storage_options.items() for f in ("--storage-option", f"{k}={v}")]
    code, checks, mismatches, _ = run_verify(capsys, out, "--sample", "100", *flags)
    assert (code, mismatches) == (0, [])
    assert checks["sampled bytes unchanged"] == (3, 0) and checks[REDETECT] == (3, 0)

    fs.pipe_file(f"{bucket}/in/{PHOTOS[0]}", photo("camera.png"))
    code, _, mismatches, _ = run_verify(capsys, out, "--sample", "100", *flags)
    assert code == 1 and len(mismatches) == 1
    assert mismatches[0].startswith(f"MISMATCH s3://{bucket}/in/{PHOTOS[0]}: bytes changed since run ")

    other = write_standin(tmp_path / "other.onnx", seed=1, channels_divisor=8, smooth=True).read_bytes()
    fs.pipe_file(f"{bucket}/models/narrow.onnx", other)
    code, _, mismatches, _ = run_verify(capsys, out, "--sample", "100", *flags)
    assert code == 1 and f"MISMATCH {model}: model at {model} has sha256 {hashlib.sha256(other).hexdigest()}, " \
                          f"rows were made with {hashlib.sha256(smooth_model.read_bytes()).hexdigest()}" in mismatches


def _det(label_id: int, score: float, box: tuple[float, float, float, float]) -> dict:
    return {"label_id": label_id, "label": str(label_id), "score": score,
            **dict(zip(("x_min", "y_min", "x_max", "y_max"), box))}


def test_detections_match_within_the_stated_tolerances():
    stored = [_det(1, 0.9, (10, 10, 50, 50)), _det(1, 0.5000, (100, 100, 140, 140)),
              _det(1, 0.4999, (200, 200, 240, 240))]
    # near-equal scores swapped in order, each off by less than the tolerances: all paired
    s, b = SCORE_TOLERANCE * 0.9, BOX_TOLERANCE_PX * 0.9
    found = [_det(1, 0.9 - s, (10 + b, 10, 50, 50 - b)), _det(1, 0.4999 + s, (200, 200, 240, 240)),
             _det(1, 0.5000 - s, (100, 100, 140 + b, 140))]
    assert match_detections(stored, found) == ([], [])
    # over a tolerance, or another label: unpaired on both sides
    for changed in (_det(1, 0.9 - 2 * SCORE_TOLERANCE, (10, 10, 50, 50)), _det(1, 0.9, (10, 10, 50 + 2 * BOX_TOLERANCE_PX, 50)),
                    _det(2, 0.9, (10, 10, 50, 50))):
        assert match_detections(stored, [changed, *found[1:]]) == ([stored[0]], [changed])
    # a detection at the threshold may fall on either side of it: not required either way
    edge = _det(3, 0.05 + SCORE_TOLERANCE / 2, (1, 1, 5, 5))
    assert match_detections([*stored, edge], found, score_threshold=0.05) == ([], [])
    assert match_detections(stored, [*found, edge], score_threshold=0.05) == ([], [])
    assert match_detections(stored, [*found, edge], score_threshold=0.04) == ([], [edge])


@pytest.mark.parametrize("flags, message", [
    (["--sample", "-1"], "--sample must be >= 0, got -1"),
    (["--model", "/nonexistent/model.onnx"], "model file not found: /nonexistent/model.onnx"),
])
def test_bad_arguments_are_one_line_and_exit_2(made, capsys, flags, message):
    assert main(["verify", str(made.out), *flags]) == 2
    assert capsys.readouterr().err == f"batchdet: error: {message}\n"


def test_a_folder_that_is_no_output_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"batchdet: error: no output at {tmp_path / 'nothing'}\n"

"""Trust over time (docs/reliability.md, "An output stays true to its inputs"):
every row records the bytes it came from; ``--resume`` brings an output up
to date with changed, added and deleted inputs, copies the result of bytes it
has seen, and refuses to mix result settings.

Each expectation is computed independently: sha256 with hashlib over the
files as they are now, detections with the single-process ``Detector``."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import pytest

from batchdet import api
from batchdet.cli import main
from batchdet.model.spec import PREPROCESSING_VERSION
from batchdet.output.layout import Output
from batchdet.output.draw import draw
from batchdet.output.query import query
from batchdet.output.summary import summarize
from batchdet.pipeline.detector import Detector
from helpers.photos import photo

#: These tests are about what a run writes, the same on either engine (the
#: contract, kills and the watchdog run on both: tests parametrised over
#: ``execution``): in-process, each run takes a second, not Ray's start.
detect = functools.partial(api.detect, execution="in-process")

PHOTOS = ("rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png", "camera.png")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(out: str, view: str = "images", storage_options: dict | None = None) -> dict[str, dict]:
    """The view's rows by URI."""
    table = query(out, f"SELECT * FROM {view} ORDER BY uri", storage_options)
    return {r["uri"]: r for r in table.to_pylist()}


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes(photo(name))
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_rows_record_the_bytes_and_resume_brings_the_output_up_to_date(narrow_model, inputs, tmp_path):
    out = str(tmp_path / "out")
    first = detect({"x": str(inputs)}, out, model=narrow_model)
    rows = _rows(out)
    assert len(rows) == len(PHOTOS) + 1
    for uri, row in rows.items():
        data = Path(uri).read_bytes()
        assert (row["sha256"], row["size"]) == (_sha(data), len(data))  # the broken file's bytes too
        assert row["version"] == f"mtime:{os.stat(uri).st_mtime}" and row["copied_from"] is None
    assert first.datasets["x"].new == len(PHOTOS) + 1 and first.settings["score_threshold"] == 0.05

    # a year later: two images overwritten, one only touched, one deleted, two added (one a copy of another)
    (inputs / "rocket.jpg").write_bytes(photo("retina.jpg"))
    (inputs / "camera.png").write_bytes(photo("coins.png"))
    os.utime(inputs / "chelsea.png")  # new mtime, same bytes
    os.remove(inputs / "astronaut.png")
    (inputs / "new.png").write_bytes(photo("text.png"))
    (inputs / "copy-of-coffee.png").write_bytes(photo("coffee.png"))
    # changed bytes behind an unchanged size and mtime: the listing vouches for it, so it is not read
    coffee = inputs / "coffee.png"
    stat = coffee.stat()
    data = bytearray(coffee.read_bytes())
    data[-20] ^= 0xFF
    coffee.write_bytes(bytes(data))
    os.utime(coffee, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    second = detect({"x": str(inputs)}, out, model=narrow_model, resume=True)
    c = second.datasets["x"]
    assert (c.already_done, c.new, c.changed, c.retried, c.gone) == (1, 2, 3, 1, 1)
    assert c.images == 6 and c.images_error == 1 and c.copied == 2 and second.ran_twice == 0

    rows = _rows(out)
    on_disk = sorted(str(p) for p in inputs.iterdir())
    assert sorted(rows) == on_disk  # exactly one current row per image that exists now
    assert rows[str(coffee)]["run_id"] == first.run_id  # skipped unread: its row still has the old bytes' digest
    assert rows[str(coffee)]["sha256"] == _sha(photo("coffee.png"))
    reference = Detector(narrow_model, threads=1)
    for uri, row in rows.items():
        if uri == str(coffee):
            continue
        data = Path(uri).read_bytes()
        assert row["run_id"] == second.run_id and row["sha256"] == _sha(data), uri
        if row["status"] == "ok":
            assert row["detections"] == reference.detect(data).detections, uri
    assert rows[str(inputs / "chelsea.png")]["copied_from"] == str(inputs / "chelsea.png")
    assert rows[str(inputs / "copy-of-coffee.png")]["copied_from"] == str(coffee)
    assert rows[str(inputs / "rocket.jpg")]["copied_from"] is None  # new bytes: the model ran

    gone = _rows(out, "latest_rows")[str(inputs / "astronaut.png")]
    assert gone["status"] == "missing" and gone["run_id"] == second.run_id and gone["detections"] is None
    summary = summarize(out)
    (d,) = summary.datasets
    assert (d.images, d.ok, d.errors, d.gone, d.copied) == (7, 6, 1, 1, 2)
    n_detections = query(out, "SELECT count(*) AS n FROM detections").column("n")[0].as_py()
    assert n_detections == sum(len(r["detections"] or []) for r in rows.values())
    gallery = draw(out, "x", tmp_path / "gallery", min_score=0.0)  # eval reads the same rows (read_dataset)
    assert sorted([d.uri for d in gallery.drawn] + [uri for uri, _ in gallery.skipped]) == on_disk

    # the deleted image comes back: it is new again
    (inputs / "astronaut.png").write_bytes(photo("astronaut.png"))
    third = detect({"x": str(inputs)}, out, model=narrow_model, resume=True)
    assert (third.datasets["x"].new, third.datasets["x"].gone, third.datasets["x"].copied) == (1, 0, 1)
    assert _rows(out)[str(inputs / "astronaut.png")]["copied_from"] == str(inputs / "astronaut.png")


def test_resume_refuses_other_result_settings_before_any_work(narrow_model, tmp_path, capsys):
    from batchdet.model.standin import write_standin

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo("rocket.jpg"))
    out = tmp_path / "out"
    detect({"x": str(folder)}, str(out), model=narrow_model)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = ["detect", "--dataset", f"x={folder}", "--output", str(out), "--execution", "in-process", "--resume"]

    capsys.readouterr()
    assert main([*argv, "--model", str(narrow_model), "--score-threshold", "0.5", "--max-pixels", "1000"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("batchdet: error:")]
    assert "--score-threshold 0.5 (the output's: 0.05)" in err and "--max-pixels 1,000 (the output's: 100,000,000)" in err
    assert "--overwrite" in err and "new output" in err

    other = write_standin(tmp_path / "other.onnx", seed=1, channels_divisor=8)
    assert main([*argv, "--model", str(other)]) == 2
    assert "--model has sha256" in capsys.readouterr().err

    # an output made before preprocessing version 2 (bytes resized): its manifest says version 1
    (manifest,) = Output(str(out)).manifest_files()
    record = json.loads(Path(manifest).read_text())
    assert record["settings"]["preprocessing"] == PREPROCESSING_VERSION == 2
    record["settings"]["preprocessing"] = 1
    Path(manifest).write_text(json.dumps(record))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main([*argv, "--model", str(narrow_model)]) == 2
    assert "batchdet's preprocessing is version 2, the output's rows were made with version 1" in \
        capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing staged, nothing leased

    assert main([*argv, "--model", str(other), "--overwrite"]) == 2  # contradiction, as before
    assert main([*argv[:-1], "--model", str(other), "--overwrite"]) == 0
    assert {r["run_id"] for r in _rows(str(out)).values()} != set()


def test_same_bytes_run_once_in_a_run(narrow_model, tmp_path):
    """Copies of one file within a run: the model runs once (one actor, one block)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"same-{i}.jpg").write_bytes(photo("rocket.jpg"))
    (folder / "other.png").write_bytes(photo("chelsea.png"))
    out = str(tmp_path / "out")
    result = detect({"x": str(folder)}, out, model=narrow_model, actors=1, batch_size=8)
    assert result.datasets["x"].copied == 3 and result.ran_twice == 0
    rows = _rows(out)
    assert [rows[str(folder / f"same-{i}.jpg")]["copied_from"] for i in range(4)] == \
        [None, *[str(folder / "same-0.jpg")] * 3]
    assert len({str(r["detections"]) for uri, r in rows.items() if Path(uri).name.startswith("same")}) == 1


def test_a_list_of_uris_is_checked_by_its_bytes(narrow_model, inputs, tmp_path):
    """A listing without version tokens (a .txt of URIs): --resume reads and hashes
    each image; unchanged bytes get their own row copied, changed ones run."""
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(inputs.iterdir())) + "\n")
    out = str(tmp_path / "out")
    first = detect({"x": str(listing)}, out, model=narrow_model)
    assert {r["version"] for r in _rows(out).values()} == {None}
    (inputs / "rocket.jpg").write_bytes(photo("retina.jpg"))
    second = detect({"x": str(listing)}, out, model=narrow_model, resume=True)
    c = second.datasets["x"]
    assert (c.already_done, c.changed, c.retried, c.copied) == (0, len(PHOTOS), 1, len(PHOTOS) - 1)
    rows = _rows(out)
    assert rows[str(inputs / "rocket.jpg")]["copied_from"] is None
    assert rows[str(inputs / "rocket.jpg")]["sha256"] == _sha(photo("retina.jpg"))
    assert all(r["run_id"] == second.run_id != first.run_id for r in rows.values())


def test_s3_listing_gives_size_and_etag_for_free(narrow_model, s3):
    """On S3 an unchanged object (same size and ETag) is skipped unread; a re-uploaded one is redone."""
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    for name in ("rocket.jpg", "chelsea.png"):
        fs.pipe(f"{bucket}/in/{name}", photo(name))
    out = f"s3://{bucket}/out"
    detect({"x": f"s3://{bucket}/in/"}, out, model=narrow_model, storage_options=s3.storage_options)
    rows = _rows(out, storage_options=s3.storage_options)
    etag = fs.info(f"{bucket}/in/rocket.jpg")["ETag"].strip('"')
    assert rows[f"s3://{bucket}/in/rocket.jpg"]["version"] == f"ETag:{etag}"
    assert rows[f"s3://{bucket}/in/rocket.jpg"]["sha256"] == _sha(photo("rocket.jpg"))

    fs.pipe(f"{bucket}/in/rocket.jpg", photo("coffee.png"))
    again = detect({"x": f"s3://{bucket}/in/"}, out, model=narrow_model, resume=True,
                   storage_options=s3.storage_options)
    c = again.datasets["x"]
    assert (c.already_done, c.changed, c.images) == (1, 1, 1)
    rows = _rows(out, storage_options=s3.storage_options)
    assert rows[f"s3://{bucket}/in/rocket.jpg"]["sha256"] == _sha(photo("coffee.png"))
    assert rows[f"s3://{bucket}/in/chelsea.png"]["run_id"] != again.run_id


def test_an_output_from_before_content_identity_reads_and_resumes(narrow_model, inputs, tmp_path):
    """Files without the identity columns (as batchdet wrote them before) still read, query
    and resume; their ok rows cannot vouch for their bytes, so --resume redoes them."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    first = detect({"x": str(inputs)}, str(out), model=narrow_model)
    for path in out.glob("dataset=x/*.parquet"):  # as an older batchdet wrote them
        pq.write_table(pq.read_table(path).drop_columns(["size", "sha256", "version", "copied_from"]), path)
    rows = _rows(str(out))
    assert len(rows) == len(PHOTOS) + 1 and {r["sha256"] for r in rows.values()} == {None}
    assert summarize(str(out)).datasets[0].ok == len(PHOTOS)

    again = detect({"x": str(inputs)}, str(out), model=narrow_model, resume=True)
    c = again.datasets["x"]
    assert (c.already_done, c.changed, c.retried, c.copied) == (0, len(PHOTOS), 1, 0)
    rows = _rows(str(out))
    assert all(r["run_id"] == again.run_id != first.run_id for r in rows.values())
    assert all(r["sha256"] == _sha(Path(uri).read_bytes()) for uri, r in rows.items())


def test_resume_with_another_engine_or_precision_is_refused(narrow_model, tmp_path, capsys):
    """Rows of another engine or precision never mix with the output's; an output
    written before batchdet recorded them resumes as what it was (onnxruntime, fp32)."""
    import json

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo("rocket.jpg"))
    out = tmp_path / "out"
    detect({"x": str(folder)}, str(out), model=narrow_model)
    argv = ["detect", "--dataset", f"x={folder}", "--output", str(out), "--execution", "in-process", "--resume",
            "--model", str(narrow_model)]
    capsys.readouterr()
    assert main([*argv, "--engine", "openvino"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("batchdet: error:")]
    assert "--engine openvino (the output's: onnxruntime)" in err and "--overwrite" in err

    (manifest,) = (out / "_runs").glob("*.json")
    record = json.loads(manifest.read_text())
    assert (record["settings"].pop("engine"), record["settings"].pop("precision")) == ("onnxruntime", "fp32")
    manifest.write_text(json.dumps(record))  # as batchdet wrote it before --precision
    assert main([*argv, "--engine", "openvino", "--precision", "fp32"]) == 2
    assert "--engine openvino (the output's: onnxruntime)" in capsys.readouterr().err
    assert main(argv) == 0  # the defaults are what the older output was made with

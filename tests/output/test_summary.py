"""``batchdet summary``: counts equal the hand-computed ones for the sample output."""

from __future__ import annotations

import re


from batchdet.cli import main
from batchdet.model.spec import KIND_TEXT, KIND_TEXT_INT8
from batchdet.output.layout import RUNS_DIR
from batchdet.output.summary import DatasetSummary, render_summary, summarize
from batchdet.storage import filesystem
from helpers.outputs import (RUN_A, RUN_B, WrittenOutput, error_row, ok_row, own_sample_output,  # noqa: F401
                             sample_output, write_output)


def test_dataset_counts_and_top_classes(sample_output: WrittenOutput) -> None:
    summary = summarize(sample_output.url, sample_output.storage_options)
    # street: a has person .95 .85, car .70 (.30 not counted); b has person .60, dog .90 (.20 not);
    # c is empty; broken is an error row. 2017: car .99, chair .51. nothing: no detections.
    assert summary.datasets == [
        DatasetSummary("2017", images=2, ok=2, errors=0, detections=2, top_classes=[("car", 1), ("chair", 1)]),
        DatasetSummary("nothing", images=2, ok=2, errors=0, detections=0, top_classes=[]),
        DatasetSummary("street", images=4, ok=3, errors=1, detections=7,
                       top_classes=[("person", 3), ("car", 1), ("dog", 1)]),
    ]


def test_min_score_and_top_change_the_class_counts(sample_output: WrittenOutput) -> None:
    summary = summarize(sample_output.url, sample_output.storage_options, min_score=0.9, top=1)
    assert [(d.name, d.top_classes) for d in summary.datasets] == [
        ("2017", [("car", 1)]), ("nothing", []), ("street", [("dog", 1)])]  # dog .90 ties person .95; by name


def test_runs_from_the_manifests(sample_output: WrittenOutput) -> None:
    runs = summarize(sample_output.url, sample_output.storage_options).runs
    assert [(r.run_id, r.finished, r.official, r.wall_s, r.images_per_s, sorted(r.datasets)) for r in runs] == [
        (RUN_A, "2025-01-01T00:00:12+00:00", True, 12.0, 0.5, ["nothing", "street"]),  # 6 images / 12 s
        (RUN_B, "2025-01-02T00:00:08+00:00", False, 8.0, 0.25, ["2017"]),  # 2 images / 8 s
    ]


def test_unreadable_manifest_is_reported_not_fatal(own_sample_output: WrittenOutput) -> None:
    fs, root = filesystem(own_sample_output.url, own_sample_output.storage_options)
    fs.pipe(f"{root}/{RUNS_DIR}/broken.json", b"{not json")
    summary = summarize(own_sample_output.url, own_sample_output.storage_options)
    assert [r.run_id for r in summary.runs] == [RUN_A, RUN_B]
    assert list(summary.unreadable_runs) == ["broken.json"]
    assert "unreadable manifest broken.json: JSONDecodeError" in render_summary(summary)


def test_epoch_times_and_missing_model_fields(tmp_path) -> None:
    write_output(str(tmp_path), {"a": [ok_row("/a/1.jpg", 1, 1, [])]},
                 [{"run_id": "r1", "started": 0, "finished": 86400.0, "datasets": {"a": {}}}])
    (run,) = summarize(str(tmp_path)).runs
    assert (run.finished, run.official, run.wall_s) == ("1970-01-02T00:00:00+00:00", None, None)
    lines = render_summary(summarize(str(tmp_path))).splitlines()
    assert lines[lines.index("runs (1)") + 2].split() == ["r1", "1970-01-02T00:00:00+00:00", "unknown", "-", "-", "a"]


def test_rows_without_manifest_are_counted_and_named(tmp_path) -> None:
    write_output(str(tmp_path), {"a": [ok_row("/a/1.jpg", 1, 1, [])]})
    summary = summarize(str(tmp_path))
    assert (summary.datasets[0].images, summary.runs, summary.runs_without_manifest) == (1, [], [RUN_A])
    assert (f"rows without a manifest from {RUN_A}: running now, or killed before committing "
            "(detect --resume commits what it staged)") in render_summary(summary)


def test_resumed_images_count_once(tmp_path) -> None:
    """Run A failed an image, run B (a --resume, recovered) redid it: one image, ok, one superseded row."""
    rows = {"a": [error_row("/a/1.jpg", "OSError: timeout", run_id=RUN_A), ok_row("/a/1.jpg", 4, 4, [], run_id=RUN_B),
                  ok_row("/a/2.jpg", 4, 4, [], run_id=RUN_A)]}
    runs = [{"run_id": RUN_A, "finished": "2025-01-01T00:00:09+00:00", "model": {"official": True}},
            {"run_id": RUN_B, "finished": "2025-01-02T00:00:09+00:00", "model": {"official": True}, "recovered": True}]
    write_output(str(tmp_path), rows, runs)
    summary = summarize(str(tmp_path))
    assert summary.datasets == [DatasetSummary("a", images=2, ok=2, errors=0, detections=0)]
    assert (summary.superseded_rows, summary.runs_without_manifest) == (1, [])
    text = render_summary(summary)
    assert "1 older rows were replaced by a later run's row for the same image (view all_images keeps them)" in text
    assert "2025-01-02T00:00:09+00:00 (recovered)  official" in text


def test_cli_prints_the_numbers(sample_output: WrittenOutput, capsys) -> None:
    assert main(["summary", sample_output.url, *sample_output.cli_storage]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"output {sample_output.url}"
    assert lines[2] == "dataset  images  ok  errors  gone  copied  detections  top classes (score >= 0.5)"
    assert lines[3].split() == ["2017", "2", "2", "0", "0", "0", "2", "car", "1,", "chair", "1"]
    assert lines[4].split() == ["nothing", "2", "2", "0", "0", "0", "0", "-"]
    assert lines[5].split() == ["street", "4", "3", "1", "0", "0", "7", "person", "3,", "car", "1,", "dog", "1"]
    assert lines[7] == "runs (2)"
    assert lines[9].split() == [RUN_A, "2025-01-01T00:00:12+00:00", "official", "12.0", "0.50", "nothing,", "street"]
    # run B's manifest says only "official": false, not which model: no stand-in note for it
    assert lines[10].split() == [RUN_B, "2025-01-02T00:00:08+00:00", "unofficial", "8.0", "0.25", "2017"]
    assert lines[-1] == lines[10] and not any("NOTE" in line for line in lines)


KIND_RUNS = [  # run id: the manifest's model section, as this and older versions wrote it
    ("r1", {"official": True, "kind": "official MLPerf weights"}, "official"),
    ("r2", {"official": False, "kind": KIND_TEXT["official-int8"]}, "official INT8"),
    ("r3", {"official": False, "kind": KIND_TEXT["standin"]}, "stand-in"),
    ("r4", {"official": False, "kind": KIND_TEXT_INT8["standin"]}, "stand-in"),
    ("r5", {"official": False, "kind": KIND_TEXT["other"]}, "other"),
    ("r6", {"official": False, "kind": "unofficial model (meets the interface; accuracy unknown)"}, "other"),
    ("r7", {"official": False}, "unofficial"),
    ("r8", {}, "unknown"),
]


def test_model_kind_of_each_run(tmp_path) -> None:
    runs = [{"run_id": r, "finished": f"2025-01-0{i + 1}T00:00:00+00:00", "datasets": {"a": {}},
             "model": {"path": "/m.onnx", "sha256": "ab" * 32, **model}} for i, (r, model, _) in enumerate(KIND_RUNS)]
    write_output(str(tmp_path), {"a": [ok_row("/a/1.jpg", 1, 1, [], run_id="r1")]}, runs)
    summary = summarize(str(tmp_path))
    assert [r.kind for r in summary.runs] == ["official", "official-int8", "standin", "standin", "other", "other",
                                              None, None]
    lines = render_summary(summary).splitlines()
    start = lines.index("runs (8)") + 2
    assert [re.split(r"\s{2,}", line)[2] for line in lines[start:start + 8]] == [label for *_, label in KIND_RUNS]
    assert lines[start + 8:] == [
        "",
        "NOTE: runs marked stand-in used made-up weights; their detections mean nothing.",
        "NOTE: runs marked official INT8 used an INT8 copy of the official weights; "
        "check its accuracy with `batchdet eval`.",
        "NOTE: runs marked other used a model that is not the official file; its accuracy is unknown.",
    ]


def test_cli_missing_output(tmp_path, capsys) -> None:
    assert main(["summary", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == f"batchdet: error: no output at {tmp_path / 'none'}\n"

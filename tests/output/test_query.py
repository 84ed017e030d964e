"""``batchdet query``: the views hold exactly what was written, locally and on S3."""

from __future__ import annotations

import csv
import io
import json

import pytest
import pyarrow as pa
from helpers.outputs import (RUN_A, RUN_B, WrittenOutput, det, error_row, f32, flat_detections, ok_row,  # noqa: F401
                             own_sample_output, sample_output, sample_rows, write_output)

from batchdet.cli import main
from batchdet.output.query import EXAMPLES, connect, query, write_result
from batchdet.storage import filesystem

DETECTION_COLUMNS = ["dataset", "uri", "width", "height", "run_id",
                     "label_id", "label", "score", "x_min", "y_min", "x_max", "y_max"]


def test_images_view_holds_every_row(sample_output: WrittenOutput) -> None:
    got = query(sample_output.url, "SELECT * FROM images ORDER BY uri", sample_output.storage_options)
    assert got.column_names == ["uri", "width", "height", "status", "error", "detections", "run_id",
                                "size", "sha256", "version", "copied_from", "dataset"]
    identity = {"size": None, "sha256": None, "version": None, "copied_from": None}
    expected = sorted((dict(identity, **r, dataset=name) for name, rows in sample_output.rows.items() for r in rows),
                      key=lambda r: r["uri"])
    for row in expected:  # float32 columns read back as float32
        for d in row["detections"] or []:
            d.update({k: f32(d[k]) for k in ("score", "x_min", "y_min", "x_max", "y_max")})
    assert got.to_pylist() == expected


def test_detections_view_is_the_flattened_rows(sample_output: WrittenOutput) -> None:
    got = query(sample_output.url, "SELECT * FROM detections", sample_output.storage_options)
    assert got.column_names == DETECTION_COLUMNS
    assert sorted(tuple(r.values()) for r in got.to_pylist()) == flat_detections(sample_output.rows)


def test_dataset_names_stay_strings(sample_output: WrittenOutput) -> None:
    """``dataset=2017`` must not become the integer 2017 (DuckDB's hive type guessing)."""
    got = query(sample_output.url, "SELECT DISTINCT dataset, typeof(dataset) AS t FROM images ORDER BY 1",
                sample_output.storage_options).to_pylist()
    assert got == [{"dataset": name, "t": "VARCHAR"} for name in ("2017", "nothing", "street")]


def test_examples_run_and_answer(sample_output: WrittenOutput) -> None:
    con = connect(sample_output.url, sample_output.storage_options)
    answers = [con.sql(sql).fetchall() for _, sql in EXAMPLES]
    top, person, errors, histogram, _ = answers
    assert top == [("2017", "car", 1), ("2017", "chair", 1), ("street", "person", 3),
                   ("street", "car", 1), ("street", "dog", 1)]
    assert person == [("street", "s3://photos/street/a.jpg")]
    assert errors == [("street", "s3://photos/street/broken.jpg",
                       "UnidentifiedImageError: cannot identify image file")]
    # ok images: a (3 at >= 0.5), b (2), c/empty/empty2 (0), x/y (1 each)
    assert histogram == [(0, 3), (1, 2), (2, 1), (3, 1)]


def test_join_example_across_datasets(tmp_path) -> None:
    def det(label: str, score: float) -> dict:
        return {"label_id": 1, "label": label, "score": score, "x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}

    rows = {"day": [ok_row("/d/p.jpg", 10, 10, [])], "night": [ok_row("/n/q.jpg", 10, 10, [])]}
    rows["day"][0]["detections"] = [det("car", 0.9), det("dog", 0.6), det("cat", 0.2)]
    rows["night"][0]["detections"] = [det("car", 0.7), det("car", 0.8), det("cat", 0.9)]
    write_output(str(tmp_path), rows)
    # cat is in both, but under 0.5 in "day"; dog only in "day"
    assert connect(str(tmp_path)).sql(EXAMPLES[4][1]).fetchall() == [("car", "day", 1, "night", 2)]


def test_the_latest_run_row_is_the_image(tmp_path) -> None:
    """After ``--resume`` retried a failed image, ``images`` holds the new row, ``all_images`` both."""
    rows = {"d": [error_row("/p/1.jpg", "OSError: timeout", run_id=RUN_A),
                  ok_row("/p/1.jpg", 10, 10, [det(1, 0.9, (1, 1, 5, 5))], run_id=RUN_B),
                  ok_row("/p/2.jpg", 10, 10, [det(3, 0.8, (2, 2, 6, 6))], run_id=RUN_A)],
            "e": [ok_row("/p/1.jpg", 10, 10, [], run_id=RUN_A)]}  # same URI, other dataset: its own image
    write_output(str(tmp_path), rows)
    con = connect(str(tmp_path))
    assert con.sql("SELECT dataset, uri, status, run_id FROM images ORDER BY ALL").fetchall() == [
        ("d", "/p/1.jpg", "ok", RUN_B), ("d", "/p/2.jpg", "ok", RUN_A), ("e", "/p/1.jpg", "ok", RUN_A)]
    assert con.sql("SELECT uri, label FROM detections ORDER BY ALL").fetchall() == [
        ("/p/1.jpg", "person"), ("/p/2.jpg", "car")]
    assert con.sql("SELECT count(*) FROM all_images").fetchall() == [(4,)]


def test_only_empty_detection_lists_give_an_empty_detections_view(tmp_path) -> None:
    write_output(str(tmp_path), {"blank": [ok_row("/b/1.jpg", 4, 4, []), ok_row("/b/2.jpg", 4, 4, [])]})
    con = connect(str(tmp_path))
    assert con.sql("SELECT count(*) FROM images").fetchall() == [(2,)]
    assert con.sql("SELECT label, count(*) FROM detections GROUP BY label").fetchall() == []
    assert [c[0] for c in con.sql("DESCRIBE detections").fetchall()] == DETECTION_COLUMNS


def test_runs_without_rows_give_empty_views(tmp_path) -> None:
    write_output(str(tmp_path), {}, [{"run_id": RUN_A}])
    con = connect(str(tmp_path))
    assert con.sql("SELECT count(*) FROM images").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM detections WHERE score > 0.5").fetchall() == [(0,)]


def test_temporary_and_hidden_files_are_ignored(own_sample_output: WrittenOutput) -> None:
    fs, root = filesystem(own_sample_output.url, own_sample_output.storage_options)
    fs.makedirs(f"{root}/dataset=street/_tmp", exist_ok=True)
    fs.pipe(f"{root}/dataset=street/.part-9.parquet", b"half-written")
    fs.pipe(f"{root}/dataset=street/_tmp/part-9.parquet", b"half-written")
    got = query(own_sample_output.url, "SELECT count(*) AS n FROM images", own_sample_output.storage_options)
    assert got.to_pylist() == [{"n": 8}]


def test_missing_or_foreign_output_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no output at"):
        connect(str(tmp_path / "nope"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a batchdet output"):
        connect(str(tmp_path / "photos"))


def test_sql_error_is_one_line(sample_output: WrittenOutput) -> None:
    with pytest.raises(ValueError) as info:
        query(sample_output.url, "SELECT nope FROM images", sample_output.storage_options)
    assert str(info.value).startswith("query failed: Binder Error") and "\n" not in str(info.value)


def test_float32_values_print_as_written() -> None:
    table = pa.table({"score": pa.array([0.9, 0.35], pa.float32()),
                      "dets": pa.array([[{"s": 0.9}], None], pa.list_(pa.struct([("s", pa.float32())])))})
    stream = io.StringIO()
    write_result(table, "json", stream)
    assert stream.getvalue().splitlines() == ['{"score": 0.9, "dets": [{"s": 0.9}]}', '{"score": 0.35, "dets": null}']


# --- CLI ------------------------------------------------------------------------
SQL = "SELECT uri, width, score, label FROM detections WHERE dataset = 'street' ORDER BY score DESC"


def _expected_street() -> list[tuple]:
    flat = flat_detections({"street": sample_rows()["street"]})
    return [(r[1], r[2], r[7], r[6]) for r in sorted(flat, key=lambda r: -r[7])]


def test_cli_csv_parses_back(sample_output: WrittenOutput, capsys) -> None:
    assert main(["query", sample_output.url, SQL, "--format", "csv", *sample_output.cli_storage]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["uri"], int(r["width"]), f32(float(r["score"])), r["label"]) for r in rows] == _expected_street()


def test_cli_json_lines_parse_back(sample_output: WrittenOutput, capsys) -> None:
    assert main(["query", sample_output.url, SQL, "--format", "json", *sample_output.cli_storage]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["uri"], r["width"], f32(r["score"]), r["label"]) for r in rows] == _expected_street()
    assert rows[0]["score"] == 0.95  # shortest float32 text, not 0.949999988079071


def test_cli_table_is_aligned_and_says_what_it_left_out(sample_output: WrittenOutput, capsys) -> None:
    assert main(["query", sample_output.url, SQL, "--max-rows", "3", *sample_output.cli_storage]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["uri", "width", "score", "label"]
    assert lines[2].split() == ["s3://photos/street/a.jpg", "640", "0.95", "person"]
    assert lines[2].index("640") + 3 == lines[0].index("width") + 5  # numbers right-aligned
    assert lines[-2].startswith("… 4 more rows not shown") and lines[-1] == "(7 rows)"


def test_cli_without_sql_shows_views_and_examples(sample_output: WrittenOutput, capsys) -> None:
    assert main(["query", sample_output.url, *sample_output.cli_storage]) == 0
    out = capsys.readouterr().out
    assert "view images:" in out and "view detections:" in out and "all_images: like images" in out
    assert "  detections   STRUCT(label_id INTEGER" in out and "  copied_from  VARCHAR" in out and "  score     FLOAT" in out
    assert all(sql in out for _, sql in EXAMPLES)


def test_cli_reads_sql_from_stdin(sample_output: WrittenOutput, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("SELECT count(*) AS n FROM detections"))
    assert main(["query", sample_output.url, "-", "--format", "csv", *sample_output.cli_storage]) == 0
    assert capsys.readouterr().out == "n\n9\n"


def test_cli_errors_are_one_line(tmp_path, sample_output: WrittenOutput, capsys) -> None:
    assert main(["query", str(tmp_path / "nope"), "SELECT 1"]) == 2
    assert capsys.readouterr().err == f"batchdet: error: no output at {tmp_path / 'nope'}\n"
    assert main(["query", sample_output.url, "SELEC 1", *sample_output.cli_storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchdet: error: query failed: Parser Error") and err.count("\n") == 1


def test_s3_output_is_read_in_place(s3) -> None:
    """The views point at s3:// URIs (read through the registered s3fs), not at local copies."""
    bucket = s3.new_bucket()
    write_output(f"s3://{bucket}/o", {"a": [ok_row("s3://x/1.jpg", 2, 2, [])]}, storage_options=s3.storage_options)
    con = connect(f"s3://{bucket}/o", s3.storage_options)
    assert con.sql("SELECT count(*) FROM images").fetchall() == [(1,)]
    assert "s3" in con.list_filesystems()
    (view_sql,) = con.sql("SELECT sql FROM duckdb_views() WHERE view_name = '_files'").fetchall()[0]
    assert f"s3://{bucket}/o/dataset=a/" in view_sql

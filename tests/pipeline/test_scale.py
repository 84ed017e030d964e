"""The driver-side commit and --resume at scale (issue 16, item 3).

The commit no longer reads detections: its counts and de-duplication must
equal what the whole-table computation it replaced gives, on staged files
with error rows, a file a retried task wrote twice, a partly overlapping file
and a half-written one. And benchmarks/scale.py at a small N: every figure it
prints follows from what it recorded (marked ``bench``: ``pytest -m bench``).
No timing is asserted (shared machine).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchdet.output.schema import FILE_SCHEMA, STATUS_OK
from batchdet.output.layout import RUN_RECORD, STAGING_DIR, Output
from batchdet.pipeline.listing import Listing
from batchdet.pipeline.update import plan_update
from batchdet.pipeline.writing import finish_run
from tests.helpers.benchmarks import run_script, script

RUN = "20250102T000000Z-0a0b0c"
SHA = "f" * 64


def _rows(uris: list[str], errors: set[str] = frozenset()) -> pa.Table:
    det = lambda i: {"label_id": 1 + i % 90, "label": "person", "score": 0.9 - i / 100,  # noqa: E731
                     "x_min": 1.0, "y_min": 2.0, "x_max": 3.0, "y_max": 4.0}
    rows = [{"uri": u, "width": None if u in errors else 10, "height": None if u in errors else 10,
             "status": "error" if u in errors else "ok", "error": "DecodeError: x" if u in errors else None,
             "detections": None if u in errors else [det(i) for i in range(len(u) % 7)],  # 0..6, some empty
             "run_id": RUN} for u in uris]
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA)


def _stage(out: Path, files: dict[str, pa.Table | bytes]) -> None:
    """``files``: {"dataset=<NAME>/<name>.parquet": rows, or raw bytes for a broken file}."""
    stage = out / STAGING_DIR / RUN
    stage.mkdir(parents=True)
    record = {"run_id": RUN, "started": "2025-01-02T00:00:00+00:00",
              "model": {"path": "m.onnx", "sha256": SHA, "official": False, "kind": "other", "kind_id": "other"},
              "datasets": {name: {"url": f"/in/{name}"} for name in ("a", "b")},
              "arguments": {}, "versions": {}}
    (stage / RUN_RECORD).write_text(json.dumps(record))
    for relative, content in files.items():
        (stage / relative).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (stage / relative).write_bytes(content)
        else:
            pq.write_table(content, stage / relative)


def _old_commit_counts(stage: Path) -> tuple[dict[str, dict[str, int]], dict[str, list[dict]]]:
    """What the commit computed before: every staged file read whole, in sorted
    order, rows whose (dataset, uri) was seen in an earlier file dropped."""
    seen, counts, kept = set(), {}, {}
    for src in sorted(stage.rglob("*.parquet")):
        dataset = src.parent.name.partition("=")[2]
        try:
            table = pq.read_table(src)
        except Exception:
            continue
        keys = [(dataset, u) for u in table.column("uri").to_pylist()]
        fresh = [k not in seen for k in keys]
        seen.update(keys)
        table = table.filter(pa.array(fresh, type=pa.bool_()))
        ok = pc.sum(pc.equal(table.column("status"), STATUS_OK)).as_py() or 0
        c = counts.setdefault(dataset, {"images": 0, "images_ok": 0, "images_error": 0, "detections": 0})
        c["images"] += table.num_rows
        c["images_ok"] += ok
        c["images_error"] += table.num_rows - ok
        c["detections"] += pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0
        kept.setdefault(dataset, []).extend(table.to_pylist())
    return counts, kept


@pytest.fixture
def staged(tmp_path):
    a = [f"/in/a/{i:03d}.jpg" for i in range(40)]
    first = _rows(a[:20], errors={a[3], a[11]})
    files = {
        "dataset=a/00first.parquet": first,
        "dataset=a/10retry.parquet": first,  # a retried write task: the same rows again
        "dataset=a/20overlap.parquet": _rows(a[15:30], errors={a[17], a[25]}),  # five rows seen before (a[17] ok there: kept)
        "dataset=a/30rest.parquet": _rows(a[30:]),
        "dataset=a/40torn.parquet": pq_bytes(_rows(a[:5]))[:-100],  # killed mid-write: no footer
        "dataset=b/00only.parquet": _rows(["/in/b/x.jpg", "/in/a/000.jpg"], errors={"/in/b/x.jpg"}),
        "dataset=b/10empty.parquet": _rows([]),
    }
    out = tmp_path / "out"
    _stage(out, files)
    return out


def pq_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_commit_counts_and_dedup_equal_the_whole_table_computation(staged):
    want_counts, want_rows = _old_commit_counts(staged / STAGING_DIR / RUN)
    result = finish_run(Output(str(staged)), RUN)
    got = {name: {k: getattr(c, k) for k in ("images", "images_ok", "images_error", "detections")}
           for name, c in result.datasets.items()}
    assert got == want_counts
    assert got["a"] == {"images": 40, "images_ok": 37, "images_error": 3, "detections": want_counts["a"]["detections"]}
    assert want_counts["a"]["detections"] > 0
    # the committed files hold exactly the rows the old computation kept, once each
    for dataset, rows in want_rows.items():
        committed = pq.read_table(sorted((staged / f"dataset={dataset}").glob("*.parquet")), partitioning=None).to_pylist()
        key = lambda r: (r["uri"], r["status"])  # noqa: E731
        assert sorted(committed, key=key) == sorted(rows, key=key)
    # every readable staged file is committed (the retried one as an empty file), the torn one is not
    assert sorted(result.files) == sorted(f"{p.parent.name}/{p.name}" for p in staged.glob("dataset=*/*.parquet"))
    assert len(result.files) == 6 and not any("torn" in f for f in result.files)
    assert not (staged / STAGING_DIR / RUN).exists()
    manifest = json.loads((staged / "_runs" / f"{RUN}.json").read_text())
    assert manifest["datasets"]["a"]["images"] == 40 and manifest["files"] == result.files


def test_update_plan_sees_each_committed_row_once(staged):
    """Rows without content identity (written before batchdet recorded it) cannot
    vouch for their bytes: ok ones are redone (copied where the bytes match)."""
    finish_run(Output(str(staged)), RUN)
    table = pq.read_table(sorted(staged.glob("dataset=a/*.parquet")), columns=["uri", "status"], partitioning=None)
    ok_a = sorted(r["uri"] for r in table.to_pylist() if r["status"] == "ok")
    assert len(ok_a) == 37
    listed = [f"/in/a/{i:03d}.jpg" for i in range(40)] + ["/in/a/new.jpg"]
    update = plan_update(Output(str(staged)), {"a": Listing("/in/a", listed, 0, 0.0)})
    c = update.counts["a"]
    assert (c.unchanged, c.new, c.retried, c.changed, c.gone) == (0, 1, 3, 37, 0)
    assert update.todo["a"].uris == listed and update.gone == {} and update.known is None


def test_commit_of_many_files_in_threads(tmp_path):
    """More files than IO_THREADS: order (which copy of a row is kept) is that of the sorted paths."""
    from batchdet.pipeline import writing

    uris = [f"/in/a/{i:04d}.jpg" for i in range(300)]
    files = {f"dataset=a/{uuid.UUID(int=i).hex}.parquet": _rows(uris[i * 10:i * 10 + 15])
             for i in range(writing.IO_THREADS * 2)}
    out = tmp_path / "out"
    _stage(out, files)
    want, kept = _old_commit_counts(out / STAGING_DIR / RUN)
    result = finish_run(Output(str(out)), RUN)
    assert result.datasets["a"].images == want["a"]["images"] == len(set(r["uri"] for r in kept["a"]))
    assert result.datasets["a"].detections == want["a"]["detections"]


# --- benchmarks/scale.py ---------------------------------------------------------------------------------
N = 2000


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    stdout = run_script("scale", "--sizes", str(N), "--rows-per-file", "64", "--workdir", str(work),
                        "--json", str(work / "scale.json"))
    return json.loads((work / "scale.json").read_text()), stdout


def test_scale_size_figures_from_synthetic_steps():
    scale = script("scale")
    update = {"unchanged": 90, "new": 1, "retried": 8, "changed": 1, "gone": 1}
    steps = {"baseline": {"rss_mb": 90.0, "seconds": 0.5, "others_cores": 0.9},
             "commit": {"rss_mb": 400.0, "seconds": 121.0, "others_cores": 0.1},
             "listing": {"rss_mb": 200.0, "seconds": 1.0, "others_cores": 0.2},
             "resume": {"rss_mb": 1600.0, "seconds": 30.0, "others_cores": 0.3, **update}}
    fig = scale.size_figures(100, 64, {"files": 2, "update": update}, steps, 1.04)
    assert (fig["staged_files"], fig["staging_s"], fig["peak_rss_mb"], fig["others_cores"]) == (3, 1.0, 1600.0, 0.9)
    assert fig["meets_targets"] == {"rss": False, "commit": False, "resume": True}  # 1.5 GB and 2 min at the most
    with pytest.raises(RuntimeError, match="update plan"):
        scale.size_figures(100, 64, {"files": 2, "update": {**update, "gone": 2}}, steps, 1.0)


@pytest.mark.bench
def test_scale_figures_follow_from_the_record(scale_run):
    report, stdout = scale_run
    (r,) = report["results"]
    e, s = r["expected"], r["steps"]
    assert r["n"] == N and e["images"] == N == e["images_ok"] + e["images_error"]
    assert 5 * e["images_ok"] <= e["detections"] <= 20 * e["images_ok"]
    assert r["staged_files"] == e["files"] + 1 == math.ceil(N / 64) + 1  # + the file a retried task wrote twice
    # the commit counted each row once, despite the duplicate file
    assert {k: s["commit"][k] for k in ("images", "images_ok", "images_error", "detections")} == \
        {k: e[k] for k in ("images", "images_ok", "images_error", "detections")}
    assert s["commit"]["files"] == r["staged_files"]
    assert s["listing"]["uris"] == N
    # the update plan: one image of N=2000 changed, one added, one deleted; the error rows retried
    assert e["update"] == {"unchanged": e["images_ok"] - 2, "retried": e["images_error"], "changed": 1, "new": 1,
                           "gone": 1}
    assert {k: s["resume"][k] for k in e["update"]} == e["update"]
    assert s["resume"]["unchanged"] + s["resume"]["retried"] == N - 2
    assert s["resume"]["todo"] == e["images_error"] + 2  # the changed, the new and the error rows
    assert s["resume"]["known"] == e["images_ok"]  # every ok row's sha256 (all distinct), the re-uploaded one's too
    for step in s.values():
        assert step["seconds"] >= 0 and step["rss_mb"] > 0 and step["cpu_s"] > 0 and step["others_cores"] >= 0
    assert s["resume"]["plan_update_s"] <= s["resume"]["seconds"]
    assert r["peak_rss_mb"] == max(s[k]["rss_mb"] for k in ("commit", "resume", "listing"))
    assert r["others_cores"] == max(step["others_cores"] for step in s.values())
    assert report["machine"]["cpu_model"] and report["commit"]
    t = report["targets"]
    assert r["meets_targets"] == {"rss": r["peak_rss_mb"] <= t["rss_mb"], "commit": s["commit"]["seconds"] <= t["commit_s"],
                                  "resume": s["resume"]["seconds"] <= t["resume_s"]}
    # the printed table is the recorded figures
    row = next(line for line in stdout.splitlines() if line.split() and line.split()[0] == str(N))
    cells = row.replace("|", " ").split()
    assert cells == [str(N), str(r["staged_files"]), f"{s['commit']['seconds']:.2f}", f"{s['commit']['rss_mb']:.0f}",
                     f"{s['resume']['seconds']:.2f}", f"{s['resume']['rss_mb']:.0f}", f"{s['resume']['cpu_s']:.1f}",
                     f"{s['listing']['seconds']:.2f}", f"{s['listing']['rss_mb']:.0f}", f"{s['baseline']['rss_mb']:.0f}",
                     f"{r['others_cores']:.2f}"]


def test_a_file_staged_before_content_identity_is_committed(tmp_path):
    """A run killed before an upgrade: its staged files lack sha256/copied_from, and still commit."""
    old = _rows([f"/in/a/{i}.jpg" for i in range(5)], errors={"/in/a/3.jpg"}).drop_columns(
        ["size", "sha256", "version", "copied_from"])
    out = tmp_path / "out"
    _stage(out, {"dataset=a/00old.parquet": old})
    result = finish_run(Output(str(out)), RUN)
    c = result.datasets["a"]
    assert (c.images, c.images_ok, c.images_error, c.copied) == (5, 4, 1, 0) and result.ran_twice == 0
    assert result.files == [f"dataset=a/{RUN}_00old.parquet"]


def test_commit_counts_copies_and_bytes_that_ran_twice(tmp_path):
    """Two actors met copies of one file at once: both ran (ran_twice 1); a third row was a copy."""
    rows = _rows([f"/in/a/{i}.jpg" for i in range(4)], errors={"/in/a/3.jpg"})
    rows = rows.set_column(rows.schema.get_field_index("sha256"), "sha256", pa.array(["x" * 64] * 3 + [None]))
    rows = rows.set_column(rows.schema.get_field_index("copied_from"), "copied_from",
                           pa.array([None, None, "/in/a/0.jpg", None]))
    out = tmp_path / "out"
    _stage(out, {"dataset=a/00first.parquet": rows.slice(0, 1), "dataset=a/10second.parquet": rows.slice(1)})
    result = finish_run(Output(str(out)), RUN)
    assert (result.datasets["a"].copied, result.ran_twice) == (1, 1)

"""One output layout (batchdet/output/layout.py): the writer and every reader agree on which files hold results.

An output is set up as a real one looks mid-life: one run staged by
``StagingSink`` and committed by ``finish_run``, a second run killed with its
files still staged, a temporary and a hidden Parquet file in a partition, a
hidden manifest temporary and a live lease. The discovery rule must return
exactly the committed run's files, and query, summary and ``--resume`` must
see exactly its rows. No Ray: the sink's ``write`` is called directly.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchdet.output.layout import Output
from batchdet.output.lease import acquire
from batchdet.output.query import open_output, query
from batchdet.output.schema import SCHEMA
from batchdet.output.summary import summarize
from batchdet.pipeline.sink import StagingSink
from batchdet.pipeline.listing import Listing
from batchdet.pipeline.update import plan_update
from batchdet.pipeline.writing import begin_run, finish_run
from batchdet.storage import full_uri
from helpers.outputs import error_row, ok_row

COMMITTED = "20261202T100000Z-c0ffee"
KILLED = "20261202T110000Z-dead00"
SHA = "5ha256"


def _rows(run_id: str) -> dict[str, list[dict[str, Any]]]:
    """Two datasets' rows of ``run_id`` (``a`` needs two write tasks: two files)."""
    return {"a": [ok_row(f"/in/a/{run_id}-1.jpg", 4, 3, [], run_id),
                  error_row(f"/in/a/{run_id}-2.jpg", "DecodeError: truncated", run_id),
                  ok_row(f"/in/a/{run_id}-3.jpg", 4, 3, [], run_id)],
            "b": [ok_row(f"/in/b/{run_id}-1.jpg", 5, 5, [], run_id)]}


def _stage(out: Output, options: dict[str, str], run_id: str) -> list[tuple[str, str]]:
    """Begin ``run_id`` and stage its rows through the sink Ray would use; its (dataset, uri) pairs."""
    rows = _rows(run_id)
    datasets = {name: {"url": f"/in/{name}"} for name in rows}
    begin_run(out, {"run_id": run_id, "started": "2026-12-02T10:00:00+00:00", "arguments": {}, "versions": {},
                    "model": {"sha256": SHA, "kind": "stand-in"}, "datasets": datasets})
    sink = StagingSink(out.url, options, run_id, rows_per_file=1)
    table = pa.Table.from_pylist([dict(r, dataset=name) for name, items in rows.items() for r in items],
                                 schema=SCHEMA)
    sink.write([table.slice(0, 2)], None)
    sink.write([table.slice(2)], None)
    return sorted((name, r["uri"]) for name, items in rows.items() for r in items)


def test_writer_and_readers_see_exactly_the_committed_files(store) -> None:
    url, options = store
    out = Output(url, options)
    with acquire(out, KILLED):  # a live lease: a file at the output's root
        committed = _stage(out, options, COMMITTED)
        result = finish_run(out, COMMITTED)
        killed = _stage(out, options, KILLED)  # killed: its files stay in _staging/
        out.fs.makedirs(out.join("dataset=a", "_tmp"), exist_ok=True)
        for name in ("dataset=a/.part-9.parquet", "dataset=a/_tmp/part-9.parquet", "dataset=b/_hidden.parquet"):
            with out.fs.open(out.join(name), "wb") as f:  # temporary or hidden: valid rows nobody may see
                pq.write_table(pa.Table.from_pylist([ok_row(f"/trap/{name}", 1, 1, [])]), f)
        out.fs.pipe_file(out.join("_runs", f".{KILLED}.json.tmp"), b"{}")

        assert len(result.files) == 3 and out.staged_runs() == [KILLED]
        assert out.data_files() == sorted(out.join(f) for f in result.files)
        snapshot = open_output(url, options)
        assert snapshot.files == tuple(full_uri(out.fs, p) for p in out.data_files())
        assert list(out.manifests()) == [COMMITTED]

        seen = query(url, "SELECT dataset, uri, run_id FROM all_images ORDER BY ALL", options).to_pylist()
        assert [(r["dataset"], r["uri"]) for r in seen] == committed
        assert {r["run_id"] for r in seen} == {COMMITTED}

        summary = summarize(url, options)
        assert [(d.name, d.images, d.ok, d.errors) for d in summary.datasets] == [("a", 3, 2, 1), ("b", 1, 1, 0)]
        assert [r.run_id for r in summary.runs] == [COMMITTED]
        assert summary.runs_without_manifest == [] and summary.unreadable_runs == {}

        # --resume's plan: the committed rows (no content identity: ok ones redone), the killed run's images new
        listed = {name: [uri for n, uri in committed + killed if n == name] for name in "ab"}
        update = plan_update(out, {name: Listing(name, uris, 0, 0.0) for name, uris in listed.items()})
        assert {name: (c.new, c.retried, c.changed, c.gone) for name, c in update.counts.items()} == \
            {"a": (3, 1, 2, 0), "b": (1, 0, 1, 0)}


def test_a_commit_killed_midway_is_finished_by_the_next_recovery(store) -> None:
    """A run killed mid-commit: one file already moved into its partition (readers
    see its rows), one rewrite cut short (garbage at its committed name, its source
    still staged), the rest staged. Recovery commits them all, adopting the moved
    file: the manifest lists and counts every row once, and ``verify`` finds no
    file without its run's manifest. A run killed after its manifest, before its
    staging folder went, is left as committed."""
    from batchdet.output.layout import committed_name
    from batchdet.pipeline.writing import recover
    from batchdet.verify import verify

    url, options = store
    out = Output(url, options)
    killed = _stage(out, options, KILLED)
    staged = out.staged_files(KILLED)
    assert len(staged) >= 3
    out.fs.makedirs(out.join("dataset=a"), exist_ok=True)
    out.fs.mv(staged[0], out.join(committed_name(KILLED, staged[0])))  # moved whole, then the kill
    out.fs.pipe_file(out.join(committed_name(KILLED, staged[1])), b"PAR1 half a file")  # a rewrite cut short
    assert len(out.data_files()) == 2 and list(out.manifests()) == []

    with acquire(out, COMMITTED) as lease:
        (result,) = recover(out, lease)
    assert result.recovered and sorted(result.files) == sorted(committed_name(KILLED, p) for p in staged)
    assert out.data_files() == sorted(out.join(f) for f in result.files) and out.staged_runs() == []
    assert {name: (c.images, c.images_ok, c.images_error) for name, c in result.datasets.items()} == \
        {"a": (3, 2, 1), "b": (1, 1, 0)}
    seen = query(url, "SELECT dataset, uri FROM all_images ORDER BY ALL", options).to_pylist()
    assert [(r["dataset"], r["uri"]) for r in seen] == killed  # every row once, the garbage replaced
    report = verify(url, options, sample=0)
    assert report.mismatches == [], report.mismatches

    # killed after its manifest, before its staging folder was gone: committed, nothing to redo
    manifest = out.fs.cat_file(out.manifest(KILLED))
    begin_run(out, json.loads(out.fs.cat_file(out.manifest(KILLED))) | {"run_id": KILLED})
    with acquire(out, COMMITTED) as lease:
        assert recover(out, lease) == []
    assert out.fs.cat_file(out.manifest(KILLED)) == manifest and out.staged_runs() == []

"""What ``--resume`` must do to bring an output up to date with its inputs.

Each listed image is compared with its current row (the latest run's, as
:meth:`batchdet.output.query.Snapshot.connect`'s ``latest_rows`` has it):

- **unchanged**: an ``ok`` row whose size and version token (S3's ETag, a
  local file's mtime) equal the listing's: skipped, its bytes never read;
- **new**: no row, or a ``missing`` one (it came back): processed;
- **retried**: an ``error`` row: processed again;
- **changed**: an ``ok`` row whose size or token differs, or where the listing
  or the row has no token (a list of URIs; a row from before batchdet
  recorded them): processed; bytes that turn out the same as an ``ok`` row's
  (by sha256) get that row's detections copied instead of a model run;
- **gone**: a current row of one of the run's datasets that the listing no
  longer holds gets a ``missing`` row, so it is no longer current.

The comparison is one DuckDB join of the output's light columns (read into
Arrow) with the listing, with no Python object per row.
Every ``ok`` row with a sha256, superseded ones too (an image deleted and
later restored), goes into the :class:`ContentIndex` the actors copy from:
all of an output's rows share one set of result settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchdet.output.content import ContentIndex
from batchdet.output.layout import Output, dataset_of
from batchdet.output.query import latest_sql
from batchdet.output.schema import FILE_SCHEMA, STATUS_MISSING, STATUS_OK
from batchdet.pipeline.listing import Listing
from batchdet.pipeline.writing import in_threads

#: The states of a listed image, in the order of :class:`UpdateCounts`' fields.
STATES = ("unchanged", "new", "retried", "changed")


@dataclass
class UpdateCounts:
    """Per dataset: how the listing compared with the output's current rows."""

    unchanged: int = 0
    new: int = 0
    retried: int = 0
    changed: int = 0
    gone: int = 0


@dataclass
class Update:
    """A resume's work: the images to process, the ones gone, and the content already known."""

    todo: dict[str, Listing]
    gone: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, UpdateCounts] = field(default_factory=dict)
    known: ContentIndex | None = None


def fresh(listings: dict[str, Listing]) -> Update:
    """The update of an output with nothing in it: everything is new."""
    return Update(dict(listings), {}, {name: UpdateCounts(new=len(l.uris)) for name, l in listings.items()})


def plan_update(out: Output, listings: dict[str, Listing]) -> Update:
    """Compare ``listings`` with ``out``'s current rows (see the module's docstring)."""
    paths = out.data_files()
    if not paths:
        return fresh(listings)
    rows = _light_rows(out, paths)
    con = duckdb.connect()
    con.register("all_rows", rows)
    con.register("listed", _listed(listings))
    con.execute(f"CREATE TEMP TABLE latest AS {latest_sql('all_rows')}")  # once, as the readers' view
    states = con.sql(f"""
        SELECT max(CASE WHEN c.uri IS NULL OR c.status = '{STATUS_MISSING}' THEN 1
                        WHEN c.status <> '{STATUS_OK}' THEN 2
                        WHEN l.version IS NOT NULL AND l.version = c.version AND l.size = c.size THEN 0
                        ELSE 3 END)::TINYINT AS state
        FROM listed l LEFT JOIN latest c ON c.dataset = l.dataset AND c.uri = l.uri
        GROUP BY l.i ORDER BY l.i""").to_arrow_table().column("state").to_numpy()
    gone_rows = con.execute(f"""
        SELECT c.dataset, c.uri FROM latest c
        WHERE c.status <> '{STATUS_MISSING}' AND c.dataset IN (SELECT DISTINCT dataset FROM listed)
          AND NOT EXISTS (SELECT 1 FROM listed l WHERE l.dataset = c.dataset AND l.uri = c.uri)
        ORDER BY c.dataset, c.uri""").fetchall()
    con.close()
    ok = pc.and_(pc.equal(rows.column("status"), STATUS_OK), pc.is_valid(rows.column("sha256")))
    known = rows.filter(ok)
    update = Update({}, {}, {}, ContentIndex.from_rows(known, paths) if known.num_rows else None)
    del rows, known
    start = 0
    for name, listing in listings.items():
        mine = states[start:start + len(listing.uris)]
        start += len(listing.uris)
        update.todo[name] = listing.only((mine != 0).tolist())
        update.counts[name] = UpdateCounts(*np.bincount(mine, minlength=len(STATES)).tolist())
    for dataset, uri in gone_rows:
        update.gone.setdefault(dataset, []).append(uri)
        update.counts[dataset].gone += 1
    return update


#: The columns of each row the plan compares: none of the detections.
LIGHT_COLUMNS = ("uri", "run_id", "status", "size", "version", "sha256")


def _light_rows(out: Output, paths: list[str]) -> pa.Table:
    """Every committed row's :data:`LIGHT_COLUMNS`, its dataset, and where it is
    (``file``: index into ``paths``; ``row`` in that file); null where a file
    from before content identity lacks a column. Read file by file, IO_THREADS
    at a time, into Arrow: no Python object per row, and no engine holding
    every file's metadata (DuckDB's ``union_by_name`` over 15,000 files cost
    ~600 MB: docs/notes/2026-12-04-trust.md)."""

    def light(item: tuple[int, str]) -> pa.Table:
        index, path = item
        with out.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            table = parquet.read(columns=[c for c in LIGHT_COLUMNS if c in names])
        n = table.num_rows
        columns = {c: table.column(c) if c in names else pa.nulls(n, FILE_SCHEMA.field(c).type) for c in LIGHT_COLUMNS}
        return pa.table({**columns, "dataset": pa.array([dataset_of(path)] * n, pa.string()),
                         "file": pa.array(np.full(n, index, np.int32)), "row": pa.array(np.arange(n, dtype=np.int32))})

    return pa.concat_tables(in_threads(light, list(enumerate(paths))))


def _listed(listings: dict[str, Listing]) -> pa.Table:
    """The listings as one table: dataset, uri, size, version, and i (the order)."""
    names, uris, sizes, versions = [], [], [], []
    for name, listing in listings.items():
        n = len(listing.uris)
        names.append(pa.array([name] * n, pa.string()) if n else pa.array([], pa.string()))
        uris.append(pa.array(listing.uris, pa.string()))
        sizes.append(pa.array(listing.sizes if listing.sizes is not None else [None] * n, pa.int64()))
        versions.append(pa.array(listing.versions if listing.versions is not None else [None] * n, pa.string()))
    table = pa.table({"dataset": pa.chunked_array(names, pa.string()), "uri": pa.chunked_array(uris, pa.string()),
                      "size": pa.chunked_array(sizes, pa.int64()), "version": pa.chunked_array(versions, pa.string())})
    return table.append_column("i", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def stage_gone(out: Output, run_id: str, gone: dict[str, list[str]]) -> None:
    """Stage a ``missing`` row for each gone image, committed with the run's other rows."""
    for dataset, uris in gone.items():
        n = len(uris)
        table = pa.table({"uri": pa.array(uris, pa.string()), "status": pa.array([STATUS_MISSING] * n, pa.string()),
                          "run_id": pa.array([run_id] * n, pa.string())})
        table = pa.table({f.name: table.column(f.name) if f.name in table.column_names else pa.nulls(n, f.type)
                          for f in FILE_SCHEMA}, schema=FILE_SCHEMA)
        out.fs.makedirs(out.staged_partition(run_id, dataset), exist_ok=True)
        with out.fs.open(out.new_staged_file(run_id, dataset), "wb") as f:
            pq.write_table(table, f)

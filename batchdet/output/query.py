"""SQL over a finished output, and the one place that knows how to read one.

An output is Hive-partitioned Parquet (``OUTPUT/dataset=<NAME>/*.parquet``)
plus run manifests (``OUTPUT/_runs/*.json``); see docs/output.md. Which files
a reader sees is :meth:`batchdet.output.layout.Output.data_files`, the writer's rule
too. DuckDB reads the Parquet files where they are: local paths natively,
everything else (``s3://``, ``gs://``, ``memory://`` …) through the fsspec
filesystem registered on the connection, so only the byte ranges a query
needs travel.

``summary``, ``evaluate`` and ``draw`` all read through :func:`open_output`
and :meth:`Snapshot.connect`, so listing rules and error messages are the same
for every command.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import Any, TextIO

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from batchdet.errors import one_line
from batchdet.output.layout import RUNS_DIR, Output
from batchdet.output.schema import SCHEMA, STATUS_MISSING
from batchdet.storage import full_uri, is_local

#: (what it answers, SQL): shown by ``batchdet query OUTPUT`` without SQL.
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("top classes per dataset (score >= 0.5)",
     "SELECT dataset, label, count(*) AS n FROM detections WHERE score >= 0.5 "
     "GROUP BY ALL ORDER BY dataset, n DESC, label LIMIT 20"),
    ("images with a person at score >= 0.8",
     "SELECT DISTINCT dataset, uri FROM detections "
     "WHERE label = 'person' AND score >= 0.8 ORDER BY ALL"),
    ("images that failed, and why",
     "SELECT dataset, uri, error FROM images WHERE status = 'error' ORDER BY ALL"),
    ("detections per image (score >= 0.5), as a histogram",
     "SELECT n, count(*) AS images FROM (SELECT len(list_filter(detections, lambda d: d.score >= 0.5)) AS n "
     "FROM images WHERE status = 'ok') GROUP BY n ORDER BY n"),
    ("classes found in two datasets, counts side by side (a join across datasets)",
     "WITH c AS (SELECT dataset, label, count(*) AS n FROM detections WHERE score >= 0.5 GROUP BY ALL) "
     "SELECT a.label, a.dataset AS a, a.n AS n_a, b.dataset AS b, b.n AS n_b "
     "FROM c a JOIN c b ON a.label = b.label AND a.dataset < b.dataset "
     "ORDER BY a.n + b.n DESC, a.label LIMIT 10"),
)


@dataclass(frozen=True)
class Snapshot:
    """An output's committed data files, listed once, so every query on it sees the
    same rows even while a run is still adding files."""

    output: Output
    #: :meth:`Output.data_files` when opened, as paths or URIs DuckDB can open.
    files: tuple[str, ...]

    def connect(self, provenance: bool = False) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with the views ``images`` (one row per
        image that exists now: its latest run's), ``detections`` (one row per
        detection of those) and ``all_images`` (every row of every file,
        superseded and ``missing`` ones included). ``provenance`` adds each
        row's ``filename`` and ``file_row_number`` to the views (``verify``'s
        per-file checks; users' queries need neither)."""
        con = duckdb.connect()
        if self.files:
            if not is_local(self.output.fs):
                con.register_filesystem(self.output.fs)
            # hive_types: a dataset named "2017" stays a string; union_by_name:
            # files written before a column was added still read.
            extra = ", filename = true, file_row_number = true" if provenance else ""
            con.execute(
                f"CREATE VIEW _files AS SELECT * FROM read_parquet({_sql_list(list(self.files))}, "
                f"hive_partitioning = true, hive_types = {{'dataset': 'VARCHAR'}}, union_by_name = true{extra})"
            )
            present = {row[0] for row in con.execute("DESCRIBE _files").fetchall()}
            # every column of the schema, NULL where no file has it yet (outputs written before it)
            columns = [name if name in present else f"CAST(NULL AS {_DUCKDB_TYPES[name]}) AS {name}"
                       for name in SCHEMA.names] + (["filename", "file_row_number"] if provenance else [])
            con.execute(f"CREATE VIEW all_images AS SELECT {', '.join(columns)} FROM _files")
        else:  # runs recorded but no rows (yet): empty views keep every query valid
            con.register("_no_images", SCHEMA.empty_table())
            extra = ", NULL::VARCHAR AS filename, NULL::BIGINT AS file_row_number" if provenance else ""
            con.execute(f"CREATE VIEW all_images AS SELECT *{extra} FROM _no_images")
        # `--resume` retries error rows and redoes changed images, so an image
        # can have rows from several runs; the latest run's row is the image's
        # result, and a `missing` one says it no longer exists. Run ids start
        # with their UTC start time, so the largest is the latest.
        # (An anti-join on the light key columns: a window over the rows would
        # materialize every detection list and is ten times slower.)
        con.execute(f"CREATE VIEW latest_rows AS {latest_sql('all_images')}")
        con.execute(f"CREATE VIEW images AS SELECT * FROM latest_rows WHERE status <> '{STATUS_MISSING}'")
        con.execute(
            "CREATE VIEW detections AS SELECT dataset, uri, width, height, run_id, "
            "d.label_id, d.label, d.score, d.x_min, d.y_min, d.x_max, d.y_max "
            "FROM (SELECT dataset, uri, width, height, run_id, unnest(detections) AS d FROM images)"
        )
        return con


def latest_sql(rows: str) -> str:
    """SQL for each image's latest row among ``rows`` (a view or table with
    dataset, uri and run_id): no later run has a row for the same image."""
    return (f"SELECT a.* FROM {rows} a ANTI JOIN (SELECT dataset, uri, run_id FROM {rows}) later "
            "ON later.dataset = a.dataset AND later.uri = a.uri AND later.run_id > a.run_id")


#: DuckDB's type of each column an older file may lack (schema.FILE_SCHEMA's content identity).
_DUCKDB_TYPES = {"size": "BIGINT", "sha256": "VARCHAR", "version": "VARCHAR", "copied_from": "VARCHAR"}


def open_output(output: str, storage_options: dict[str, Any] | None = None) -> Snapshot:
    """Open ``output`` (a local path or any fsspec URL); OSError/ValueError if it is not one.

    An output needs at least one Parquet partition or one run manifest, so a
    typo in the path fails here with the path in the message instead of as an
    empty result later.
    """
    out = Output(output, storage_options)
    if not out.fs.exists(out.root):
        raise FileNotFoundError(f"no output at {output}")
    snapshot = Snapshot(out, tuple(full_uri(out.fs, path) for path in out.data_files()))
    if not snapshot.files and not out.manifest_files():
        raise ValueError(f"{output} is not a batchdet output: no dataset=<NAME>/*.parquet files "
                         f"and no {RUNS_DIR}/*.json")
    return snapshot


def connect(output: str, storage_options: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the ``images`` and ``detections`` views over ``output``."""
    return open_output(output, storage_options).connect()


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    """Run ``sql`` and return its result; DuckDB errors become a one-line ValueError.

    Statements without a result (``SET …``) give an empty table.
    """
    try:
        relation = con.sql(sql, params=params)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as e:
        raise ValueError(f"query failed: {one_line(e, with_type=False)}") from None


def query(output: str, sql: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Run ``sql`` against the ``images`` and ``detections`` views of ``output``."""
    return run_sql(connect(output, storage_options), sql)


def read_dataset(snapshot: Snapshot, dataset: str) -> pa.Table:
    """All ``images`` rows of one dataset, ordered by URI; ValueError naming the datasets there are."""
    con = snapshot.connect()
    rows = run_sql(con, "SELECT * FROM images WHERE dataset = ? ORDER BY uri", [dataset])
    if rows.num_rows == 0:
        names = run_sql(con, "SELECT DISTINCT dataset FROM images ORDER BY dataset").column(0).to_pylist()
        raise ValueError(f"no dataset {dataset!r} in {snapshot.output.url} (datasets: {', '.join(names) or 'none'})")
    return rows


def view_columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    """{view: [(column, DuckDB type), …]} for ``images`` and ``detections``."""
    return {
        view: [(row[0], row[1]) for row in con.execute(f"DESCRIBE {view}").fetchall()]
        for view in ("images", "detections")
    }


def render_overview(columns: dict[str, list[tuple[str, str]]]) -> str:
    """What ``batchdet query OUTPUT`` prints without SQL: the views and examples to copy."""
    lines = []
    for view, cols in columns.items():
        lines.append(f"view {view}:")
        width = max(len(name) for name, _ in cols)
        lines += [f"  {name:<{width}}  {kind}" for name, kind in cols]
        lines.append("")
    lines.append("all_images: like images, plus rows that a later run (--resume) superseded, and rows "
                 "with status 'missing' for images no longer listed.")
    lines.append("")
    lines.append("examples:")
    for title, sql in EXAMPLES:
        lines += [f"  -- {title}", f"  {sql}", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- printing results -----------------------------------------------------------
def write_result(table: pa.Table, fmt: str, stream: TextIO, max_rows: int = 40) -> None:
    """Write ``table`` to ``stream`` as ``table`` (aligned text), ``csv`` or ``json``.

    ``json`` is JSON Lines: one object per row, so large results stream into
    ``jq`` or pandas ``read_json(lines=True)``. Only ``table`` is cut at
    ``max_rows``; csv and json always carry every row.
    """
    if fmt == "table":
        stream.write(format_table(table, max_rows))
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_csv_cell(v) for v in row] for row in _rows(table))
    elif fmt == "json":
        for row in _rows(table):
            record = dict(zip(table.column_names, row))
            stream.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}: use table, csv or json")


def format_table(table: pa.Table, max_rows: int = 40, max_width: int = 60) -> str:
    """An aligned text table of the first ``max_rows`` rows, saying how many were left out."""
    shown = table.slice(0, max_rows)
    cells = [[_text_cell(v, max_width) for v in row] for row in _rows(shown)]
    right = {i for i, f in enumerate(table.schema) if _is_numeric(f.type)}
    out = aligned_lines(table.column_names, cells, right, rule=True)
    omitted = table.num_rows - shown.num_rows
    if omitted:
        out.append(f"… {omitted:,} more rows not shown (add LIMIT/WHERE, or use --format csv|json for all)")
    out.append(f"({table.num_rows:,} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out) + "\n"


def aligned_lines(header: list[str], rows: list[list[str]], right: set[int], rule: bool = False) -> list[str]:
    """Text columns padded to a common width; columns in ``right`` (numbers) right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return [line(header), *(["  ".join("-" * w for w in widths)] if rule else []), *map(line, rows)]


def _rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """Rows as tuples of Python values, float32 numbers as their shortest decimal (0.9, not 0.899999976…).

    Tuples, not dicts: a join's result may repeat a column name.
    """
    columns = [_shortest_floats(column.combine_chunks()).to_pylist() for column in table.columns]
    return list(zip(*columns))


def _shortest_floats(array: pa.Array) -> pa.Array:
    """``array`` with every float32 (also inside lists and structs) as the float64 it prints as.

    Arrow's float32→string cast yields the shortest round-tripping text, so
    parsing that back as float64 gives what a reader of the data expects.
    """
    kind = array.type
    if pa.types.is_float32(kind) or pa.types.is_float16(kind):
        return pc.cast(pc.cast(array, pa.string()), pa.float64())
    if pa.types.is_struct(kind):
        children = [_shortest_floats(child) for child in array.flatten()]
        names = [kind.field(i).name for i in range(kind.num_fields)]
        return pa.StructArray.from_arrays(children, names=names, mask=array.is_null())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        cls = pa.ListArray if pa.types.is_list(kind) else pa.LargeListArray
        return cls.from_arrays(array.offsets, _shortest_floats(array.values), mask=array.is_null())
    return array


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _text_cell(value: Any, max_width: int) -> str:
    text = "NULL" if value is None else str(_csv_cell(value)).replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _sql_list(items: list[str]) -> str:
    """A DuckDB list literal of string constants (single quotes doubled)."""
    return "[" + ", ".join("'" + item.replace("'", "''") + "'" for item in items) + "]"

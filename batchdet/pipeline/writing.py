"""An output's life: stage a run, commit it, write its manifest last; recover
what a killed run staged; tell ``--resume`` what is already done.

Layout (docs/output.md; every path rule is in batchdet/output/layout.py):
``dataset=<NAME>/<run_id>_<…>.parquet`` and ``_runs/<run_id>.json``. While a
run works, its rows are staged as Parquet under ``_staging/<run_id>/``
(:func:`stage_rows`) beside a ``_run.json`` record of the run. Committing
moves each complete, readable file into its partition — a rename locally, a
whole-object copy on S3, so a reader sees a file whole or not at all — drops
rows a retried task wrote twice, and writes the manifest *last*: a run's rows
count as committed once ``_runs/<run_id>.json`` exists. A run killed on the
way leaves its staging folder behind; the next ``--resume`` commits the
files in it that are whole (a half-written file fails its Parquet footer
check and is discarded), adopts the files a commit cut short had already
moved, and writes that run's manifest, marked ``recovered``.
"""

from __future__ import annotations

import json
import platform
import posixpath
from importlib.metadata import version
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchdet import __version__
from batchdet.files import replace_bytes
from batchdet.output.layout import DATA_SUFFIX, PARTITION, RUNS_DIR, Output, committed_name, dataset_of
from batchdet.output.lease import Lease
from batchdet.output.manifest import DatasetCounts, RunResult
from batchdet.output.schema import STATUS_MISSING, STATUS_OK
from batchdet.pipeline.precision import openvino_version


def stage_rows(out: Output, run_id: str, table: pa.Table) -> None:
    """``table``'s rows (the contract's, with ``dataset``) as one Parquet file per
    dataset, ``_staging/<run_id>/dataset=<NAME>/<uuid>.parquet``, the dataset
    in the folder name only (as the contract reads it)."""
    datasets = table.column("dataset")
    for name in pc.unique(datasets).to_pylist():
        out.fs.makedirs(out.staged_partition(run_id, name), exist_ok=True)
        with out.fs.open(out.new_staged_file(run_id, name), "wb") as f:
            pq.write_table(table.filter(pc.equal(datasets, name)).drop_columns(["dataset"]), f)


def begin_run(out: Output, record: dict[str, Any]) -> None:
    """Write the run's record into its staging folder before any work."""
    out.fs.makedirs(out.staging(record["run_id"]), exist_ok=True)
    out.fs.pipe_file(out.run_record(record["run_id"]), json.dumps(record).encode())


def _read_whole(out: Output, path: str) -> pa.Table | None:
    """A staged file's rows, or None when it is incomplete or unreadable."""
    try:
        with out.fs.open(path, "rb") as f:
            return pq.read_table(f)
    except Exception:
        return None


#: Files read (or moved) at once by the commit and ``--resume``: each is a
#: request or two, so on S3 they wait on latency rather than on the driver's CPU.
IO_THREADS = 16


#: The content identity columns the commit reads (null in files staged before them).
IDENTITY_KEYS = ("sha256", "copied_from")


def _read_keys(out: Output, path: str) -> pa.Table | None:
    """A staged file's ``uri``, ``status``, ``sha256`` and ``copied_from``, and
    ``detections`` cut down to one int32 leaf (enough for the lists' lengths,
    never the detections themselves), or None when the file is incomplete or
    unreadable (a half-written file has no Parquet footer)."""
    try:
        with out.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            leaf = next(parquet.schema.column(i).path for i in range(len(parquet.schema))
                        if parquet.schema.column(i).path.startswith("detections."))
            names = parquet.schema_arrow.names
            table = parquet.read(columns=["uri", "status", *(c for c in IDENTITY_KEYS if c in names), leaf])
        table.column("detections")  # the leaf named a column this file has
        for name in IDENTITY_KEYS:  # staged by a batchdet from before content identity
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        return table
    except Exception:
        return None


def in_threads(fn: Callable[[Any], Any], items: list) -> Iterator[Any]:
    """``map(fn, items)``, in order, IO_THREADS at a time; each result is
    handed on as soon as it and those before it are ready."""
    threads = min(IO_THREADS, len(items))
    if threads < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque[Future] = deque()  # bounded: results never pile up ahead of the caller
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def finish_run(out: Output, run_id: str, wall_s: float | None = None, recovered: bool = False,
               timings: dict[str, float] | None = None) -> RunResult:
    """Commit ``run_id``'s staged files, count them, write the manifest, drop the staging folder.

    The driver reads each file's footer and its ``uri``/``status`` columns and
    one int32 leaf of ``detections`` (for the count); it reads a file whole
    only to drop rows a retried task wrote twice. De-duplication is exact:
    every URI committed so far, per dataset, is kept as a Python string.
    """
    record = json.loads(out.fs.cat_file(out.run_record(run_id)))
    counts = {name: DatasetCounts.from_dict(d) for name, d in record["datasets"].items()}
    entries = _run_files(out, run_id, recovered)
    sources = [src for src, _, _ in entries]
    seen: dict[str, set[str]] = {}
    ran: list[pa.ChunkedArray] = []  # sha256 of the rows the model ran for
    files, moves, rewrites = [], [], []
    for (src, relative, staged), keys in zip(entries, in_threads(lambda p: _read_keys(out, p), sources)):
        dataset = dataset_of(src)
        if keys is None or dataset not in counts:
            continue
        uris = keys.column("uri").to_pylist()
        done = seen.setdefault(dataset, set())
        fresh = [u not in done for u in uris]
        done.update(uris)
        if all(fresh):
            if staged:
                moves.append((src, relative))
        else:  # a retried task wrote these rows twice: keep the first copy
            keys = keys.filter(pa.array(fresh))
            rewrites.append((src, relative, fresh))
        files.append(relative)
        _count(counts[dataset], keys)
        ran.append(keys.filter(pc.and_(pc.equal(keys.column("status"), STATUS_OK),
                                       pc.is_null(keys.column("copied_from")))).column("sha256"))
    del seen
    ran_sha = pa.chunked_array([c for r in ran for c in r.chunks], pa.string()).drop_null()
    ran_twice = len(ran_sha) - (pc.count_distinct(ran_sha).as_py() if len(ran_sha) else 0)
    for partition in sorted({relative.partition("/")[0] for relative in files}):
        out.fs.makedirs(out.join(partition), exist_ok=True)
    for src, relative, fresh in rewrites:
        table = _read_whole(out, src)
        if table is None:
            raise RuntimeError(f"staged file {src} became unreadable during the commit")
        with out.fs.open(out.join(relative), "wb") as f:
            pq.write_table(table.filter(pa.array(fresh)), f)
    for _ in in_threads(lambda move: out.fs.mv(move[0], out.join(move[1])), moves):
        pass
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    images = sum(c.images for c in counts.values())
    result = RunResult(
        run_id=run_id, output=out.url, started=record["started"], finished=finished,
        wall_s=None if wall_s is None else round(wall_s, 3),
        images_per_s=None if not wall_s else round(images / wall_s, 4),
        datasets=counts, model=record["model"], arguments=record["arguments"],
        versions=record["versions"], files=files, recovered=recovered,
        settings=record.get("settings", {}), ran_twice=ran_twice,
        execution=record.get("execution"), timings=timings or {}, engine=record.get("engine") or {},
    )
    _write_manifest(out, result)
    out.fs.rm(out.staging(run_id), recursive=True)
    return result


def _run_files(out: Output, run_id: str, recovered: bool) -> list[tuple[str, str, bool]]:
    """(path, committed name, still staged) of each of ``run_id``'s files, in commit order.

    Its staged files, and when recovering a killed run, the files its commit
    had already moved into their partitions: a move removes its source only
    once the file is whole at its destination, so those are whole, and
    without them the recovered manifest would miss rows readers already see.
    A committed name that is still staged too (a rewrite cut short) is redone
    from its staged source."""
    entries = {committed_name(run_id, p): (p, True) for p in out.staged_files(run_id)}
    if recovered:
        for path in out.fs.glob(out.join(f"{PARTITION}*", f"{run_id}_*{DATA_SUFFIX}")):
            relative = f"{posixpath.basename(posixpath.dirname(path))}/{posixpath.basename(path)}"
            entries.setdefault(relative, (path, False))
    return [(path, relative, staged) for relative, (path, staged) in sorted(entries.items())]


def _count(c: DatasetCounts, table: pa.Table) -> None:
    """Add ``table``'s rows to ``c``; ``detections`` may be the whole column or one leaf of it."""
    status = table.column("status")
    ok = pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0
    gone = pc.sum(pc.equal(status, STATUS_MISSING)).as_py() or 0
    c.images += table.num_rows - gone
    c.images_ok += ok
    c.images_error += table.num_rows - gone - ok
    c.gone += gone
    c.copied += pc.sum(pc.is_valid(table.column("copied_from"))).as_py() or 0
    c.detections += pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0


def _write_manifest(out: Output, result: RunResult) -> None:
    """``_runs/<run_id>.json``, whole: written under a temporary name, then renamed."""
    out.fs.makedirs(out.join(RUNS_DIR), exist_ok=True)
    replace_bytes(out.fs, out.manifest(result.run_id), result.to_json().encode())


def recover(out: Output, lease: Lease) -> list[RunResult]:
    """Commit what killed runs staged (called before this run stages anything).

    Only the holder of the output's lease may: a run still writing holds a
    live lease, so no other run does, and committing its staging folder
    under it would corrupt both. The lease is checked against the store first.
    A staging folder without a run record (every run writes its record before
    any row) is what a frozen run staged after its lease was taken over and
    its run recovered: it is never committed, and is removed here.
    """
    lease.check()
    results = []
    for run_id in out.staged_runs():
        if run_id == lease.run_id:
            continue
        if not out.fs.exists(out.run_record(run_id)) or out.fs.exists(out.manifest(run_id)):
            # an orphan, or committed and killed while dropping its staging folder
            out.fs.rm(out.staging(run_id), recursive=True)
        else:
            results.append(finish_run(out, run_id, recovered=True))
    return results


def versions() -> dict[str, str]:
    """Versions of what made the rows (Ray's from its package metadata: a run
    that needs no Ray does not import it for this; onnxruntime's from the module,
    whichever of its distributions provides it)."""
    import onnxruntime

    openvino = openvino_version()
    return {"batchdet": __version__, "ray": version("ray"), "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), **({"openvino": openvino} if openvino else {})}

"""An output's life: stage a run, commit it, write its manifest last; recover
what a killed run staged; tell ``--resume`` what is already done.

Layout (CONTRACT.md): ``dataset=<NAME>/<run_id>_<…>.parquet`` and
``_runs/<run_id>.json``. While a run works, Ray writes its Parquet under
``_staging/<run_id>/`` beside a ``_run.json`` record of the run. Committing
moves each complete, readable file into its partition — a rename locally, a
whole-object copy on S3, so a reader sees a file whole or not at all — drops
rows a retried task wrote twice, and writes the manifest *last*: a run's rows
count as committed once ``_runs/<run_id>.json`` exists. A run killed on the
way leaves its staging folder behind; the next ``--resume`` commits the
files in it that are whole (a half-written file fails its Parquet footer
check and is discarded) and writes that run's manifest, marked ``recovered``.
"""

from __future__ import annotations

import json
import platform
import posixpath
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchdet import __version__
from batchdet.schema import RUNS_DIR, STATUS_OK
from batchdet.storage import filesystem

STAGING_DIR = "_staging"
RUN_RECORD = "_run.json"


@dataclass
class DatasetCounts:
    url: str
    images: int = 0
    images_ok: int = 0
    images_error: int = 0
    detections: int = 0
    skipped_files: int = 0  # files under the URL that are not images
    already_done: int = 0  # images --resume found done and did not process again
    listing_seconds: float = 0.0


@dataclass
class RunResult:
    """A committed run: exactly what its manifest says."""

    run_id: str
    output: str
    started: str
    finished: str
    wall_s: float | None
    images_per_s: float | None
    datasets: dict[str, DatasetCounts]
    model: dict[str, Any]
    arguments: dict[str, Any]
    versions: dict[str, str]
    files: list[str] = field(default_factory=list)
    recovered: bool = False  # committed by a later --resume after the run was killed

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_text(self) -> str:
        """The end-of-run summary a person reads."""
        lines = [f"run {self.run_id} -> {self.output}",
                 f"  {'dataset':<20} {'images':>8} {'ok':>8} {'errors':>8} {'detections':>11} {'done before':>12}"]
        for name, c in self.datasets.items():
            lines.append(f"  {name:<20} {c.images:>8} {c.images_ok:>8} {c.images_error:>8} {c.detections:>11}"
                         f" {c.already_done:>12}")
        total = sum(c.images for c in self.datasets.values())
        if self.wall_s is not None:
            lines.append(f"  {total} images in {self.wall_s:.1f} s = {self.images_per_s:.2f} images/s")
        lines.append(f"  model: {self.model.get('kind', 'kind not recorded')}, sha256 {self.model['sha256'][:12]}")
        return "\n".join(lines)


class Output:
    """An output directory on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, root = filesystem(url, storage_options)
        self.root = root.rstrip("/")

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def manifests(self) -> dict[str, dict]:
        """Committed runs: ``_runs/<run_id>.json`` contents by run id."""
        pattern = self.join(RUNS_DIR, "*.json")
        return {posixpath.basename(p)[: -len(".json")]: json.loads(self.fs.cat_file(p))
                for p in self.fs.glob(pattern) if not posixpath.basename(p).startswith(".")}

    def staged_runs(self) -> list[str]:
        """Run ids with a staging folder: running now, or killed."""
        return sorted(posixpath.basename(p) for p in self.fs.glob(self.join(STAGING_DIR, "*")))

    def data_files(self) -> list[str]:
        return sorted(self.fs.glob(self.join("dataset=*", "*.parquet")))

    def is_empty(self) -> bool:
        return not (self.data_files() or self.staged_runs() or self.manifests())

    def clear(self) -> None:
        """Remove everything batchdet wrote here (``--overwrite``)."""
        for path in self.fs.glob(self.join("dataset=*")) + [self.join(RUNS_DIR), self.join(STAGING_DIR)]:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)


def begin_run(out: Output, record: dict[str, Any]) -> None:
    """Write the run's record into its staging folder before any work."""
    out.fs.makedirs(out.join(STAGING_DIR, record["run_id"]), exist_ok=True)
    out.fs.pipe_file(out.join(STAGING_DIR, record["run_id"], RUN_RECORD), json.dumps(record).encode())


def _read_whole(out: Output, path: str) -> pa.Table | None:
    """A staged file's rows, or None when it is incomplete or unreadable."""
    try:
        with out.fs.open(path, "rb") as f:
            return pq.read_table(f)
    except Exception:
        return None


def finish_run(out: Output, run_id: str, wall_s: float | None = None, recovered: bool = False) -> RunResult:
    """Commit ``run_id``'s staged files, count them, write the manifest, drop the staging folder."""
    stage = out.join(STAGING_DIR, run_id)
    record = json.loads(out.fs.cat_file(posixpath.join(stage, RUN_RECORD)))
    counts = {name: DatasetCounts(**d) for name, d in record["datasets"].items()}
    seen: set[tuple[str, str]] = set()
    files = []
    for src in sorted(p for p in out.fs.find(stage) if p.endswith(".parquet")):
        partition = posixpath.basename(posixpath.dirname(src))  # dataset=<NAME>
        dataset = partition.partition("=")[2]
        table = _read_whole(out, src)
        if table is None or dataset not in counts:
            continue
        keys = [(dataset, u) for u in table.column("uri").to_pylist()]
        fresh = [k not in seen for k in keys]
        seen.update(keys)
        relative = f"{partition}/{run_id}_{posixpath.basename(src)}"
        out.fs.makedirs(out.join(partition), exist_ok=True)
        if all(fresh):
            out.fs.mv(src, out.join(relative))
        else:  # a retried task wrote these rows twice: keep the first copy
            table = table.filter(pa.array(fresh))
            with out.fs.open(out.join(relative), "wb") as f:
                pq.write_table(table, f)
        files.append(relative)
        _count(counts[dataset], table)
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    images = sum(c.images for c in counts.values())
    result = RunResult(
        run_id=run_id, output=out.url, started=record["started"], finished=finished,
        wall_s=None if wall_s is None else round(wall_s, 3),
        images_per_s=None if not wall_s else round(images / wall_s, 4),
        datasets=counts, model=record["model"], arguments=record["arguments"],
        versions=record["versions"], files=files, recovered=recovered,
    )
    _write_manifest(out, result)
    out.fs.rm(stage, recursive=True)
    return result


def _count(c: DatasetCounts, table: pa.Table) -> None:
    ok = pc.sum(pc.equal(table.column("status"), STATUS_OK)).as_py() or 0
    c.images += table.num_rows
    c.images_ok += ok
    c.images_error += table.num_rows - ok
    c.detections += pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0


def _write_manifest(out: Output, result: RunResult) -> None:
    """``_runs/<run_id>.json``, whole: written under a temporary name, then renamed."""
    final = out.join(RUNS_DIR, f"{result.run_id}.json")
    temp = out.join(RUNS_DIR, f".{result.run_id}.json.tmp")
    out.fs.makedirs(out.join(RUNS_DIR), exist_ok=True)
    out.fs.pipe_file(temp, result.to_json().encode())
    out.fs.mv(temp, final)


def recover(out: Output) -> list[RunResult]:
    """Commit what killed runs staged (called before this run stages anything)."""
    return [finish_run(out, run_id, recovered=True) for run_id in out.staged_runs()
            if out.fs.exists(out.join(STAGING_DIR, run_id, RUN_RECORD))]


def done_uris(out: Output, model_sha256: str) -> dict[str, set[str]]:
    """Per dataset, the URIs that already have an ``ok`` row from a committed
    run of the same model (``--resume`` skips them; error rows are retried)."""
    runs = {run_id for run_id, m in out.manifests().items() if m["model"]["sha256"] == model_sha256}
    done: dict[str, set[str]] = {}
    for path in out.data_files():
        if posixpath.basename(path).split("_", 1)[0] not in runs:
            continue
        with out.fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["uri", "status"])
        dataset = posixpath.basename(posixpath.dirname(path)).partition("=")[2]
        ok = table.filter(pc.equal(table.column("status"), STATUS_OK)).column("uri").to_pylist()
        done.setdefault(dataset, set()).update(ok)
    return done


def versions() -> dict[str, str]:
    import onnxruntime
    import ray

    return {"batchdet": __version__, "ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


"""Committing a run: count what was staged, move it into place, write the manifest last.

Ray writes the run's Parquet under ``OUTPUT/_staging/<run_id>/``; only when
every file is complete are they moved into ``OUTPUT/dataset=<NAME>/`` (a
rename locally, a whole-object copy on S3 — either way a reader sees a file
whole or not at all), and only then is ``_runs/<run_id>.json`` written.
"""

from __future__ import annotations

import json
import posixpath
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from batchdet import __version__
from batchdet.plan import RunPlan
from batchdet.schema import RUNS_DIR, STATUS_OK
from batchdet.storage import filesystem, redact


@dataclass
class DatasetCounts:
    url: str
    images: int = 0
    images_ok: int = 0
    images_error: int = 0
    detections: int = 0
    skipped_files: int = 0
    listing_seconds: float = 0.0


@dataclass
class RunResult:
    """What a finished run reports: the manifest's content."""

    run_id: str
    output: str
    started: str
    finished: str
    wall_s: float
    images_per_s: float
    datasets: dict[str, DatasetCounts]
    model: dict[str, Any]
    arguments: dict[str, Any]
    versions: dict[str, str]
    files: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_text(self) -> str:
        """The end-of-run summary a person reads."""
        lines = [f"run {self.run_id} -> {self.output}",
                 f"  {'dataset':<20} {'images':>8} {'ok':>8} {'errors':>8} {'detections':>11}"]
        for name, c in self.datasets.items():
            lines.append(f"  {name:<20} {c.images:>8} {c.images_ok:>8} {c.images_error:>8} {c.detections:>11}")
        total = sum(c.images for c in self.datasets.values())
        lines.append(f"  {total} images in {self.wall_s:.1f} s = {self.images_per_s:.2f} images/s")
        lines.append(f"  model: {self.model['kind']} ({self.model['sha256'][:12]})")
        return "\n".join(lines)


def count_staged(plan: RunPlan, staging: str) -> dict[str, DatasetCounts]:
    """Per-dataset counts read back from the staged files (3 small columns)."""
    counts = {
        name: DatasetCounts(url=l.url, skipped_files=l.skipped, listing_seconds=round(l.seconds, 3))
        for name, l in plan.listings.items()
    }
    fs, path = filesystem(staging, plan.storage_options)
    if not fs.exists(path):
        return counts
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["dataset", "status", "detections"]
    )
    lengths = pc.fill_null(pc.list_value_length(table.column("detections")), 0)
    for dataset, status, n in zip(
        table.column("dataset").to_pylist(), table.column("status").to_pylist(), lengths.to_pylist()
    ):
        c = counts[dataset]
        c.images += 1
        c.detections += n
        if status == STATUS_OK:
            c.images_ok += 1
        else:
            c.images_error += 1
    return counts


def commit(plan: RunPlan, staging: str) -> list[str]:
    """Move staged files into their partitions; return their paths relative to the output."""
    fs, stage_path = filesystem(staging, plan.storage_options)
    _, out_path = filesystem(plan.output, plan.storage_options)
    moved = []
    for src in sorted(fs.find(stage_path)) if fs.exists(stage_path) else []:
        partition = posixpath.basename(posixpath.dirname(src))  # dataset=<NAME>
        name = f"{plan.run_id}_{posixpath.basename(src)}"
        relative = f"{partition}/{name}"
        fs.makedirs(f"{out_path.rstrip('/')}/{partition}", exist_ok=True)
        fs.mv(src, f"{out_path.rstrip('/')}/{relative}")
        moved.append(relative)
    if fs.exists(stage_path):
        fs.rm(stage_path, recursive=True)
    return moved


def write_manifest(result: RunResult, storage_options: dict[str, Any]) -> str:
    """Write ``_runs/<run_id>.json`` whole (temp name, then rename) and return its path."""
    fs, out_path = filesystem(result.output, storage_options)
    final = f"{out_path.rstrip('/')}/{RUNS_DIR}/{result.run_id}.json"
    temp = f"{out_path.rstrip('/')}/{RUNS_DIR}/.{result.run_id}.json.tmp"
    fs.makedirs(posixpath.dirname(final), exist_ok=True)
    fs.pipe_file(temp, result.to_json().encode())
    fs.mv(temp, final)
    return final


def versions() -> dict[str, str]:
    import onnxruntime
    import ray

    return {"batchdet": __version__, "ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def arguments(plan: RunPlan) -> dict[str, Any]:
    """The run's arguments as a user would re-type them, secrets removed."""
    return {
        "datasets": {name: l.url for name, l in plan.listings.items()},
        "output": plan.output,
        "model": plan.model.path,
        "score_threshold": plan.score_threshold,
        "actors": list(plan.actors) if plan.actors else None,
        "threads_per_actor": plan.threads_per_actor,
        "gpus_per_actor": plan.gpus_per_actor,
        "batch_size": plan.batch_size,
        "max_pixels": plan.max_pixels,
        "storage_options": redact(plan.storage_options),
    }

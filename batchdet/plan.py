"""Everything about a run that can be checked before Ray starts.

Bad arguments must fail fast with one line, not minutes into a cluster job:
dataset names, the model file, every input URL (listed here, so "no images"
and "unknown bucket" surface now) and whether the output can be written.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from batchdet.distribution import resolve_model
from batchdet.listing import Listing, list_images
from batchdet.preprocess import DEFAULT_MAX_PIXELS
from batchdet.progress import DEFAULT_STALL_S
from batchdet.schema import RUNS_DIR, check_dataset_name
from batchdet.spec import NMS_SCORE_THRESHOLD, ModelInfo
from batchdet.storage import filesystem, redact

#: Rows Ray collects before writing a Parquet file. Fewer, larger files query
#: faster; smaller ones lose less work when a run is killed (what is not yet
#: in a file is redone by --resume). 64 images is ~3 minutes of one 2-core
#: node's work with the full model.
DEFAULT_ROWS_PER_FILE = 64


@dataclass(frozen=True)
class RunPlan:
    """A validated run: what to read, with which model, where to write."""

    run_id: str
    listings: dict[str, Listing]
    output: str
    model: ModelInfo
    score_threshold: float = NMS_SCORE_THRESHOLD
    actors: tuple[int, int] | None = None  # None: pipeline.actor_layout decides
    threads_per_actor: int | None = None  # None: 1 (GPU actors: the node's CPUs, at most 4)
    gpus_per_actor: float = 0.0
    batch_size: int | None = None  # images per block; None: pipeline.images_per_block decides
    max_pixels: int = DEFAULT_MAX_PIXELS
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    storage_options: dict[str, Any] = field(default_factory=dict)
    stall_timeout: float = DEFAULT_STALL_S  # seconds with no image finished before the run fails; 0: never

    @property
    def num_images(self) -> int:
        return sum(len(listing.uris) for listing in self.listings.values())

    def without(self, done: dict[str, set[str]]) -> "RunPlan":
        """The same run minus images already done (``--resume``)."""
        listings = {
            name: dataclasses.replace(l, uris=[u for u in l.uris if u not in done.get(name, ())])
            for name, l in self.listings.items()
        }
        return dataclasses.replace(self, listings=listings)

    def arguments(self) -> dict[str, Any]:
        """The run's arguments as a user would re-type them, secrets removed."""
        return {
            "datasets": {name: l.url for name, l in self.listings.items()},
            "output": self.output,
            "model": self.model.path,
            "score_threshold": self.score_threshold,
            "actors": list(self.actors) if self.actors else None,
            "threads_per_actor": self.threads_per_actor,
            "gpus_per_actor": self.gpus_per_actor,
            "batch_size": self.batch_size,
            "max_pixels": self.max_pixels,
            "rows_per_file": self.rows_per_file,
            "storage_options": redact(self.storage_options),
            "stall_timeout": self.stall_timeout,
        }


def new_run_id() -> str:
    """Sortable by time, unique across concurrent drivers."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def parse_dataset(spec: str) -> tuple[str, str]:
    """``"coco=s3://bucket/val2017"`` → ``("coco", "s3://bucket/val2017")``."""
    name, sep, url = spec.partition("=")
    if not sep or not url:
        raise ValueError(f"bad --dataset {spec!r}: expected NAME=URL")
    return check_dataset_name(name), url


def parse_actors(spec: str) -> tuple[int, int]:
    """``"2"`` → (2, 2); ``"1:8"`` → (1, 8)."""
    low, _, high = spec.partition(":")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"bad --actors {spec!r}: expected MIN or MIN:MAX (whole numbers)") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"bad --actors {spec!r}: need 1 <= MIN <= MAX")
    return bounds


def check_writable(output: str, storage_options: dict[str, Any]) -> None:
    """Create the output's ``_runs/`` and write + delete a probe file there."""
    fs, path = filesystem(output, storage_options)
    probe = f"{path.rstrip('/')}/{RUNS_DIR}/.probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(f"{path.rstrip('/')}/{RUNS_DIR}", exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:
        raise ValueError(f"cannot write to output {output}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def plan_run(
    datasets: dict[str, str],
    output: str,
    model: str | os.PathLike | None = None,
    score_threshold: float = NMS_SCORE_THRESHOLD,
    actors: tuple[int, int] | None = None,
    threads_per_actor: int | None = None,
    gpus_per_actor: float = 0.0,
    batch_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    storage_options: dict[str, Any] | None = None,
    stall_timeout: float = DEFAULT_STALL_S,
) -> RunPlan:
    """Validate every argument and list the inputs; raise ValueError on the first problem."""
    if not datasets:
        raise ValueError("no --dataset given")
    for name in datasets:
        check_dataset_name(name)
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold {score_threshold} is outside [0, 1]")
    if min(batch_size or 1, rows_per_file, threads_per_actor or 1) < 1 or min(gpus_per_actor, stall_timeout) < 0:
        raise ValueError("--batch-size, --rows-per-file and --threads-per-actor must be >= 1, "
                         "--gpus-per-actor and --stall-timeout >= 0")
    options = dict(storage_options or {})

    # A URL model is fetched into this node's cache and checked here; info.path keeps URL#sha256=<hex>.
    info = resolve_model(model, options)
    listings = {name: list_images(url, options) for name, url in datasets.items()}
    check_writable(output, options)
    return RunPlan(
        run_id=new_run_id(),
        listings=listings,
        output=output,
        model=info,
        score_threshold=score_threshold,
        actors=actors,
        threads_per_actor=threads_per_actor,
        gpus_per_actor=gpus_per_actor,
        batch_size=batch_size,
        max_pixels=max_pixels,
        rows_per_file=rows_per_file,
        storage_options=options,
        stall_timeout=stall_timeout,
    )

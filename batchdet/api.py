"""``batchdet.detect``: the whole job as one Python call (the CLI's ``detect``)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable

from batchdet.lease import Lease, acquire
from batchdet.pipeline import ray_session, run_pipeline
from batchdet.plan import DEFAULT_ROWS_PER_FILE, RunPlan, plan_run
from batchdet.preprocess import DEFAULT_MAX_PIXELS
from batchdet.progress import DEFAULT_STALL_S, Progress
from batchdet.spec import NMS_SCORE_THRESHOLD
from batchdet.writing import Output, RunResult, begin_run, done_uris, finish_run, recover, versions

log = logging.getLogger("batchdet")


def detect(
    datasets: dict[str, str],
    output: str,
    model: str | os.PathLike | None = None,
    score_threshold: float = NMS_SCORE_THRESHOLD,
    actors: tuple[int, int] | None = None,
    threads_per_actor: int | None = None,
    gpus_per_actor: float = 0.0,
    batch_size: int | None = None,
    address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    resume: bool = False,
    overwrite: bool = False,
    stall_timeout: float = DEFAULT_STALL_S,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunResult:
    """Detect objects in every image of ``datasets`` ({name: url}) and write
    one Parquet row per image under ``output/dataset=<name>/``.

    Arguments are validated (and inputs listed) before Ray starts; a bad one
    raises ValueError. Per-image failures become error rows, never exceptions.
    An output that already holds results is refused unless ``resume`` (commit
    what killed runs left, skip images already ``ok`` with this model, retry
    the rest) or ``overwrite`` (start again from nothing). ``on_progress``
    is called about once a second with a :class:`batchdet.progress.Progress`
    (images done of the total, rate, time left) while images are processed.
    A run in which no image finishes for ``stall_timeout`` seconds (or four
    times the longest gap between blocks, if longer; 0: never) raises
    :class:`batchdet.progress.Stalled` naming the stage; what it wrote so far
    is kept for ``resume``.
    """
    if resume and overwrite:  # before listing anything, and before facing another run's lease
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    plan = plan_run(
        datasets, output, model=model, score_threshold=score_threshold, actors=actors,
        threads_per_actor=threads_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size,
        max_pixels=max_pixels, rows_per_file=rows_per_file, storage_options=storage_options,
        stall_timeout=stall_timeout,
    )
    for name, listing in plan.listings.items():
        log.info("dataset %s: %d images listed (%d other files skipped) in %.2f s",
                 name, len(listing.uris), listing.skipped, listing.seconds)
    out = Output(output, plan.storage_options)
    with acquire(out, plan.run_id) as lease:  # one writer per output, released however the run ends
        done = _prepare_output(out, plan, lease, resume, overwrite)
        todo = plan.without(done)
        begin_run(out, _record(todo, plan, done))
        clock = time.perf_counter()
        if todo.num_images:
            with ray_session(address) as local:
                run_pipeline(todo, local, on_progress)
        lease.check()  # taken over while this run was frozen: the staged rows are a --resume's now
        result = finish_run(out, plan.run_id, wall_s=time.perf_counter() - clock)
    missing = todo.num_images - sum(c.images for c in result.datasets.values())
    if missing:
        raise RuntimeError(f"{missing} image(s) of run {plan.run_id} have no row; run again with --resume")
    return result


def _prepare_output(out: Output, plan: RunPlan, lease: Lease, resume: bool, overwrite: bool) -> dict[str, set[str]]:
    """Refuse, clear or recover the output, its ``lease`` held (so no other
    run is writing it); return what --resume may skip."""
    if overwrite:
        out.clear()
    elif not resume and not out.is_empty():
        raise ValueError(f"output {out.url} already holds batchdet results: "
                         "pass --resume to continue them or --overwrite to replace them")
    if not resume:
        return {}
    for result in recover(out, lease):
        log.info("recovered %d rows staged by killed run %s",
                 sum(c.images for c in result.datasets.values()), result.run_id)
    return done_uris(out, plan.model.sha256)


def _record(todo: RunPlan, plan: RunPlan, done: dict[str, set[str]]) -> dict[str, Any]:
    """What the manifest will say besides the counts, fixed before work starts."""
    return {
        "run_id": plan.run_id,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": plan.model.path, "sha256": plan.model.sha256, "official": plan.model.official,
                  "kind": plan.model.kind, "kind_id": plan.model.kind_id},
        "datasets": {
            name: {"url": l.url, "skipped_files": l.skipped, "listing_seconds": round(l.seconds, 3),
                   "already_done": len(plan.listings[name].uris) - len(l.uris)}
            for name, l in todo.listings.items()
        },
        "arguments": plan.arguments(),
        "versions": versions(),
    }

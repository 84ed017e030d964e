"""``batchdet.api.detect``: the whole job as one Python call (the CLI's ``detect``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from batchdet.console import log_path
from batchdet.model.distribution import local_model
from batchdet.options import OPENVINO, DetectOptions
from batchdet.output.layout import Output
from batchdet.output.lease import Lease, acquire
from batchdet.output.manifest import RunResult
from batchdet.output.settings import check_same_settings
from batchdet.pipeline.in_process import choose_execution, run_in_process
from batchdet.pipeline.plan import RunPlan, plan_run
from batchdet.pipeline.precision import openvino_version
from batchdet.pipeline.speedup import SAMPLE_IMAGES, measure_once
from batchdet.pipeline.run import ray_console_to, ray_session, run_pipeline
from batchdet.pipeline.update import Update, UpdateCounts, fresh, plan_update, stage_gone
from batchdet.pipeline.writing import begin_run, finish_run, recover, versions
from batchdet.progress import Progress

log = logging.getLogger("batchdet")


def detect(
    datasets: dict[str, str],
    output: str,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_listing: Callable[[str, int], None] | None = None,
    ray_log: Path | bool = True,
    **options: Any,
) -> RunResult:
    """Detect objects in every image of ``datasets`` ({name: url}) and write
    one Parquet row per image under ``output/dataset=<name>/``.

    ``options`` are the keyword arguments of :class:`batchdet.options.DetectOptions`
    (``model``, ``score_threshold``, ``actors``, ``batch_size``, ``resume``, …),
    with its defaults; see :func:`run`.
    """
    return run(DetectOptions(datasets, output, **options), on_progress, on_listing, ray_log)


def run(options: DetectOptions, on_progress: Callable[[Progress], None] | None = None,
        on_listing: Callable[[str, int], None] | None = None, ray_log: Path | bool = True) -> RunResult:
    """Run ``detect`` with ``options`` (what the CLI, job specs and ``detect()`` build).

    Inputs are listed and the model and output checked before Ray starts; a
    bad one raises ValueError. Per-image failures become error rows, never exceptions.
    An output that already holds results is refused unless ``resume`` (bring
    it up to date with the inputs: commit what killed runs left, skip images
    unchanged since their ``ok`` row, process new, changed and failed ones,
    mark vanished ones ``missing``; refused if the result settings differ)
    or ``overwrite`` (start again from nothing). ``on_progress``
    is called about once a second with a :class:`batchdet.progress.Progress`
    (images done of the total, rate, time left) while images are processed.
    A run in which no image finishes for ``stall_timeout`` seconds (or four
    times the longest gap between blocks, if longer; 0: never) raises
    :class:`batchdet.progress.Stalled` naming the stage; what it wrote so far
    is kept for ``resume``. A run through Ray sends Ray's own log lines to
    ``ray_log`` (True: a new file under ``$TMPDIR/batchdet-logs/``, named in
    batchdet's INFO log; False: left on stderr where Ray puts them).
    """
    timings = Timings()
    plan = plan_run(options, on_listing)
    timings.mark("planned")
    for name, listing in plan.listings.items():
        log.info("dataset %s: %d images listed (%d other files skipped) in %.2f s",
                 name, len(listing.uris), listing.skipped, listing.seconds)
    out = Output(options.output, options.storage_options)
    with acquire(out, plan.run_id) as lease:  # one writer per output, released however the run ends
        update = _prepare_output(out, plan, lease)
        todo = dataclasses.replace(plan, listings=update.todo)
        execution = choose_execution(options, todo.num_images) if todo.num_images else None
        # after the output's checks, on images this run will process: nothing is timed for a refused run
        begin_run(out, {**_record(plan, update), "execution": execution, "engine": engine_record(todo)})
        stage_gone(out, plan.run_id, update.gone)
        timings.mark("prepared")
        clock = time.perf_counter()
        if execution == "ray":
            with ray_console_to(_ray_log(ray_log)), ray_session(options.address) as local:
                timings.mark("engine_up")
                timings.add(run_pipeline(todo, local, on_progress, known=update.known))
        elif execution:
            timings.add(run_in_process(todo, on_progress, known=update.known))
        timings.mark("processed")
        lease.check()  # taken over while this run was frozen: the staged rows are a --resume's now
        result = finish_run(out, plan.run_id, wall_s=time.perf_counter() - clock, timings=timings.offsets)
    missing = todo.num_images - sum(c.images for c in result.datasets.values())
    if missing:
        raise RuntimeError(f"{missing} image(s) of run {plan.run_id} have no row; run again with --resume")
    return result


def _ray_log(ray_log: Path | bool) -> Path | None:
    """The file Ray's log lines go to (see :func:`run`), or None: left as they are."""
    if ray_log is True:
        ray_log = log_path()
        log.info("Ray's log lines: %s", ray_log)
    return ray_log or None


class Timings:
    """When a run reached each step, as seconds since it began (the manifest's
    ``timings``; ``start`` is that beginning, epoch seconds)."""

    def __init__(self) -> None:
        self.offsets: dict[str, float] = {"start": round(time.time(), 3)}

    def mark(self, step: str, at: float | None = None) -> None:
        self.offsets[step] = round((time.time() if at is None else at) - self.offsets["start"], 3)

    def add(self, steps: dict[str, float | None]) -> None:
        """The engine's own steps (epoch seconds; None: not reached)."""
        for step, at in steps.items():
            if at is not None:
                self.mark(step, at)


def _prepare_output(out: Output, plan: RunPlan, lease: Lease) -> Update:
    """Refuse, clear or recover the output, its ``lease`` held (so no other
    run is writing it); return what the run must do to bring it up to date."""
    if plan.options.overwrite:
        out.clear()
    elif not plan.options.resume and not out.is_empty():
        raise ValueError(f"output {out.url} already holds batchdet results: "
                         "pass --resume to bring them up to date or --overwrite to replace them")
    if not plan.options.resume:
        return fresh(plan.listings)
    check_same_settings(out, plan.settings())  # killed runs' records too, before their rows are committed
    for result in recover(out, lease):
        log.info("recovered %d rows staged by killed run %s",
                 sum(c.images for c in result.datasets.values()), result.run_id)
    update = plan_update(out, plan.listings)
    for name, c in update.counts.items():
        log.info("dataset %s: %d unchanged, %d new, %d changed, %d errors to retry, %d gone",
                 name, c.unchanged, c.new, c.changed, c.retried, c.gone)
    return update


def engine_record(plan: RunPlan) -> dict[str, Any]:
    """What runs the model (the manifest's ``engine``). For OpenVINO, also its speed
    against onnxruntime on this CPU: measured in this process on the first images
    ``plan`` lists the first time (:func:`batchdet.pipeline.speedup.measure_once`),
    remembered after."""
    choice = plan.choice
    record: dict[str, Any] = {"name": choice.engine, "precision": choice.precision,
                              "version": openvino_version() if choice.engine == OPENVINO else versions()["onnxruntime"]}
    if choice.engine == OPENVINO:
        uris = [uri for listing in plan.listings.values() for uri in listing.uris[:2 * SAMPLE_IMAGES]]
        model = local_model(plan.model.path, storage_options=plan.options.storage_options)  # a URL model: the cached copy
        speedup, measured = measure_once(choice, str(model), plan.model.sha256, uris,
                                         plan.options.storage_options)
        if speedup is not None:
            record.update(speedup=speedup.to_dict(), speedup_text=speedup.to_text(), speedup_measured=measured)
    return record


def _planned(c: UpdateCounts) -> dict[str, int]:
    """A dataset's counts the plan knows (the commit adds what was written)."""
    return {"already_done": c.unchanged, "new": c.new, "changed": c.changed, "retried": c.retried}


def _record(plan: RunPlan, update: Update) -> dict[str, Any]:
    """What the manifest will say besides the counts, fixed before work starts."""
    return {
        "run_id": plan.run_id,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": plan.model.path, "sha256": plan.model.sha256, "official": plan.model.official,
                  "kind": plan.model.kind, "kind_id": plan.model.kind_id},
        "settings": plan.settings().to_dict(),
        "datasets": {
            name: {"url": l.url, "skipped_files": l.skipped, "listing_seconds": round(l.seconds, 3),
                   **_planned(update.counts[name])}
            for name, l in plan.listings.items()
        },
        "arguments": plan.arguments(),
        "versions": versions(),
    }

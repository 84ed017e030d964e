"""Everything about a run that can be checked before Ray starts.

Bad arguments must fail fast with one line, not minutes into a cluster job.
The options checked themselves when built (:mod:`batchdet.options`); here:
the model file, whether this CPU and the installed engines can run the
precision asked for, every input URL (listed here, so "no images" and "unknown
bucket" surface now) and whether the output can be written.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from batchdet.errors import one_line
from batchdet.model.distribution import resolve_model
from batchdet.model.spec import ModelInfo
from batchdet.options import DetectOptions
from batchdet.output.layout import RUNS_DIR, Output
from batchdet.output.settings import ResultSettings, check_same_settings
from batchdet.pipeline.listing import Listing, list_images
from batchdet.pipeline.precision import DEFAULT_CHOICE, Choice, choose
from batchdet.storage import redact


@dataclass(frozen=True)
class RunPlan:
    """A validated run: its options, what they list, and the model they resolve to
    (``plan.model``, where ``plan.options.model`` is what was asked for)."""

    run_id: str
    options: DetectOptions
    listings: dict[str, Listing]
    model: ModelInfo
    choice: Choice = DEFAULT_CHOICE  # the engine and precision (pipeline.precision.choose)

    @property
    def num_images(self) -> int:
        return sum(len(listing.uris) for listing in self.listings.values())

    def settings(self) -> ResultSettings:
        """What this run's rows depend on besides the images (recorded in its manifest)."""
        return result_settings(self.options, self.model, self.choice)

    def arguments(self) -> dict[str, Any]:
        """The run's arguments as a user would re-type them, secrets removed."""
        return {**self.options.to_spec(defaults=True), "model": self.model.path,
                "storage_options": redact(self.options.storage_options)}


def result_settings(options: DetectOptions, model: ModelInfo, choice: Choice) -> ResultSettings:
    """The result settings ``options`` give with ``model`` run as ``choice``."""
    return ResultSettings(model.sha256, options.score_threshold, options.max_pixels,
                          engine=choice.engine, precision=choice.precision)


def new_run_id(now: float | None = None) -> str:
    """Sortable by time to the millisecond (an image's latest row is the one of
    the greatest run_id, and two in-process runs fit in one second), unique
    across concurrent drivers: ``20261204T151949123Z-e70536``."""
    now = time.time() if now is None else now
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z-" + secrets.token_hex(3)


def check_writable(output: str, storage_options: dict[str, Any]) -> None:
    """Create the output's ``_runs/`` and write + delete a probe file there."""
    out = Output(output, storage_options)
    probe = out.join(RUNS_DIR, f".probe-{uuid.uuid4().hex}")  # hidden: no reader counts it as a manifest
    try:
        out.fs.makedirs(out.join(RUNS_DIR), exist_ok=True)
        out.fs.pipe_file(probe, b"")
        out.fs.rm_file(probe)
    except Exception as e:
        raise ValueError(f"cannot write to output {output}: {one_line(e)}") from None


def check_working_directory() -> None:
    """Refuse to run where a folder named ``batchdet`` would shadow the
    package on Ray's workers: Ray puts the driver's working directory on
    their path, and with an editable install that folder wins the import."""
    spec = importlib.machinery.PathFinder.find_spec("batchdet", [os.getcwd(), *sys.path])
    if spec is not None and spec.origin is None:  # a namespace portion: no regular package found before it
        raise ValueError(f"the folder {os.path.join(os.getcwd(), 'batchdet')} would hide the batchdet package "
                         "from Ray's workers (Ray puts the working directory on their path): run from another folder")


def plan_run(options: DetectOptions, on_listing: Callable[[str, int], None] | None = None) -> RunPlan:
    """Check the model, list every input and probe the output (the options
    themselves were checked when built); raise ValueError on the first problem.
    ``on_listing(dataset, files found so far)`` follows a long listing."""
    check_working_directory()
    # A URL model is fetched into this node's cache and checked here; info.path keeps URL#sha256=<hex>.
    info = resolve_model(options.model, options.storage_options)
    # this CPU and the installed engines can run what was asked, and which file (an INT8 copy for int8)
    choice, info = choose(options.precision, options.engine, options.gpus_per_actor, info)
    if options.resume:  # before a long listing; checked again once the output's lease is held
        check_same_settings(Output(options.output, options.storage_options), result_settings(options, info, choice))
    listings = {
        name: list_images(url, options.storage_options,
                          on_progress=on_listing and functools.partial(on_listing, name))
        for name, url in options.datasets.items()
    }
    check_writable(options.output, options.storage_options)
    return RunPlan(run_id=new_run_id(), options=options, listings=listings, model=info, choice=choice)

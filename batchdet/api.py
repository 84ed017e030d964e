"""``batchdet.detect``: the whole job as one Python call (the CLI's ``detect``)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any

from batchdet.pipeline import ray_session, run_pipeline, staging_dir
from batchdet.plan import plan_run
from batchdet.preprocess import DEFAULT_MAX_PIXELS
from batchdet.spec import NMS_SCORE_THRESHOLD
from batchdet.writing import RunResult, arguments, commit, count_staged, versions, write_manifest


def detect(
    datasets: dict[str, str],
    output: str,
    model: str | os.PathLike | None = None,
    score_threshold: float = NMS_SCORE_THRESHOLD,
    actors: tuple[int, int] | None = None,
    threads_per_actor: int | None = None,
    gpus_per_actor: float = 0.0,
    batch_size: int = 4,
    address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> RunResult:
    """Detect objects in every image of ``datasets`` ({name: url}) and write
    one Parquet row per image under ``output/dataset=<name>/``.

    Arguments are validated (and inputs listed) before Ray starts; a bad one
    raises ValueError. Per-image failures become error rows, never exceptions.
    """
    plan = plan_run(
        datasets, output, model=model, score_threshold=score_threshold, actors=actors,
        threads_per_actor=threads_per_actor, gpus_per_actor=gpus_per_actor,
        batch_size=batch_size, max_pixels=max_pixels, storage_options=storage_options,
    )
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    with ray_session(address):
        run_pipeline(plan)
    staging = staging_dir(plan)
    counts = count_staged(plan, staging)
    files = commit(plan, staging)
    wall = time.perf_counter() - clock
    result = RunResult(
        run_id=plan.run_id,
        output=plan.output,
        started=started.isoformat(timespec="seconds"),
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(wall, 3),
        images_per_s=round(plan.num_images / wall, 4) if wall > 0 else 0.0,
        datasets=counts,
        model={"path": plan.model.path, "sha256": plan.model.sha256, "official": plan.model.official,
               "kind": plan.model.kind},
        arguments=arguments(plan),
        versions=versions(),
        files=files,
    )
    write_manifest(result, plan.storage_options)
    return result

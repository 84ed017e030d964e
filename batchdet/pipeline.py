"""The Ray Data job: listing → read → prepare → inference → Parquet, in one function."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import pyarrow as pa

from batchdet.plan import RunPlan
from batchdet.stages import IMAGE_BYTES, InferenceStage, prepare_batch, read_batch
from batchdet.writing import STAGING_DIR, Output

log = logging.getLogger("batchdet")

#: Logical CPUs a preprocessing task asks for. Decode + resize costs a few ms
#: against seconds of inference, so a task needs only a slice of a core. An
#: actor running N onnxruntime threads asks Ray for N - PREPARE_CPUS, which
#: leaves a task's slice free per actor beside actors that fill a node: full
#: CPUs for both would deadlock a node (the actors waiting for input no task
#: can be scheduled to produce).
PREPARE_CPUS = 0.25
#: Images per preprocessing task batch: a 17 MB block of resized uint8. Small
#: blocks keep what the object-store cap below must hold small, and balance
#: the last blocks across actors; a task still does ~12 ms of work.
PREPARE_BATCH = 4
#: Prepared blocks Ray Data may hold in the object store per inference actor
#: (and never fewer than twice that in all). Decode + resize is ~500× faster
#: than inference on a CPU, so without a cap every image of the dataset is
#: prepared at once and waits in the object store: memory then grows with the
#: dataset (950 MB at 320 images, benchmarks/prefetch.py; 16–20 images
#: whatever the size with the cap). Ray Data splits the cap among its
#: operators, and a share smaller than one block starves the actors (a
#: 150 MB cap with 35 MB blocks did); 4 blocks per actor keeps each share
#: above a block (README, "What costs throughput").
PREFETCH_BLOCKS_PER_ACTOR = 4


#: Ray node settings batchdet starts its embedded Ray with, and which a
#: cluster's nodes should have too (as ``RAY_<name>`` environment variables of
#: ``ray start``: :func:`node_environment`; infra/docker/Dockerfile sets them).
#: Ray keeps one idle worker per CPU and kills the others after 1 s idle.
#: Preprocessing tasks take a quarter CPU, so more of them run at once than a
#: node has CPUs while the first blocks are prepared; afterwards one runs each
#: time an actor frees a block, seconds apart, and found its worker killed: a
#: new Python worker, ~1.5 s of CPU taken from the model per block (16 workers
#: started for 20 blocks; every 4th image took 4 s instead of 2.5: README,
#: "What costs throughput" 2). A minute keeps them warm between blocks and
#: still reaps them after the run.
NODE_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def node_environment() -> dict[str, str]:
    """:data:`NODE_CONFIG` as the environment variables ``ray start`` reads."""
    return {f"RAY_{name}": str(value) for name, value in NODE_CONFIG.items()}


def local_ray_options() -> dict:
    """``ray.init`` arguments of an embedded Ray: always one of our own
    (``address="local"``, never a cluster someone ``ray start``ed here), no
    dashboard, and :data:`NODE_CONFIG`."""
    return {"address": "local", "include_dashboard": False, "_system_config": dict(NODE_CONFIG)}


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Join ``address`` (or ``$RAY_ADDRESS``), reuse a Ray already initialised
    in this process, or start an embedded one and shut it down afterwards.
    Yields whether the Ray is this machine's alone (no autoscaler behind it)."""
    import ray

    if ray.is_initialized():
        yield not (address or os.environ.get("RAY_ADDRESS"))
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(**local_ray_options())
    try:
        yield not address
    finally:
        if not address:
            ray.shutdown()


def actor_layout(plan: RunPlan, local: bool) -> tuple[int, tuple[int, int]]:
    """(threads per actor, (min, max) actors) for the cluster Ray sees.

    By default a CPU actor runs one onnxruntime thread, one actor per CPU.
    In a multi-threaded session a thread preempted by any other process
    (Ray's own wake hundreds of times a second) stalls its peers at every
    operator's end; single-threaded sessions lose only their own time. On
    2 cores: +7.6 % in steady state over one 2-thread actor (0.425 against
    0.395 images/s, two runs each), +2.5–4 % end to end at 40 images, for
    ~0.5 GB per extra actor (README, "What costs throughput" 3). A GPU
    actor's threads only feed its device: the node's CPUs, up to 4. On the
    embedded Ray the pool starts at its maximum: Ray Data adds actors only
    when their input queue builds up, which for a small dataset it never does.
    """
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_node = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]) or 1
    threads = plan.threads_per_actor or (min(per_node, 4) if plan.gpus_per_actor else 1)
    gpus = ray.cluster_resources().get("GPU", 0)
    # Ray would wait forever for an actor no node can hold. On the embedded
    # Ray nothing will ever add a node, so refuse; on a cluster an autoscaler
    # may still bring one (a GPU group scaled to zero), so only warn.
    problems = [f"--threads-per-actor {threads} exceeds the largest node's {per_node} CPUs"] * (threads > per_node)
    problems += [f"--gpus-per-actor {plan.gpus_per_actor} but the cluster has {gpus:g} GPUs now"] * (
        plan.gpus_per_actor > gpus)
    for problem in problems:
        if local:
            raise ValueError(problem)
        log.warning("%s; waiting for the autoscaler to add a node that fits", problem)
    high = max(1, cpus // threads)
    if plan.gpus_per_actor:
        high = min(high, max(1, int(gpus / plan.gpus_per_actor)))
    return threads, plan.actors or (high if local else 1, high)


def run_pipeline(plan: RunPlan, local: bool = True) -> None:
    """Stream every listed image through the model into staged Parquet
    (``local``: on an embedded Ray that no autoscaler will grow)."""
    import ray.data

    threads, (low, high) = actor_layout(plan, local)
    with ray.data.DataContext.current(job_context(high)):
        _stream(plan, threads, low, high)


def object_store_cap(actors: int) -> int:
    """Bytes of prepared images Ray Data may hold for ``actors`` inference actors."""
    return max(actors, 2) * PREFETCH_BLOCKS_PER_ACTOR * PREPARE_BATCH * IMAGE_BYTES


def job_context(actors: int) -> ray.data.DataContext:
    """A copy of the caller's DataContext with the object store capped (the
    caller's own context, process-global, stays as it was)."""
    import ray.data

    ctx = ray.data.DataContext.get_current().copy()
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(
        object_store_memory=min(limits.object_store_memory, object_store_cap(actors)))
    return ctx


def _stream(plan: RunPlan, threads: int, low: int, high: int) -> None:
    """The job itself, read top to bottom."""
    import ray.data

    items = [{"dataset": name, "uri": uri} for name, listing in plan.listings.items() for uri in listing.uris]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // PREPARE_BATCH, 10_000)))
    ds = ds.map_batches(
        read_batch, fn_kwargs={"storage_options": plan.storage_options},
        batch_format="pyarrow", batch_size=PREPARE_BATCH, num_cpus=PREPARE_CPUS,
    )
    ds = ds.map_batches(
        prepare_batch, fn_kwargs={"max_pixels": plan.max_pixels},
        batch_format="pyarrow", batch_size=PREPARE_BATCH, num_cpus=PREPARE_CPUS,
    )
    ds = ds.map_batches(
        InferenceStage,
        fn_constructor_kwargs={
            "model_path": plan.model.path, "run_id": plan.run_id, "threads": threads,
            "gpus": plan.gpus_per_actor, "score_threshold": plan.score_threshold,
            "storage_options": plan.storage_options,  # for a URL model: each node fetches its own copy
        },
        batch_format="pyarrow", batch_size=plan.batch_size,
        # one block at a time per CPU actor (seconds each): the first actor up
        # cannot hoard blocks its peers then wait for, and the tail balances;
        # a GPU actor (milliseconds a block) keeps a second one queued
        compute=ray.data.ActorPoolStrategy(
            min_size=low, max_size=high, max_tasks_in_flight_per_actor=2 if plan.gpus_per_actor else 1),
        num_cpus=threads - PREPARE_CPUS, num_gpus=plan.gpus_per_actor or None,
    )
    out = Output(plan.output, plan.storage_options)
    ds.write_parquet(
        out.join(STAGING_DIR, plan.run_id), partition_cols=["dataset"], min_rows_per_file=plan.rows_per_file,
        filesystem=pa.fs.PyFileSystem(pa.fs.FSSpecHandler(out.fs)),
        ray_remote_args={"num_cpus": PREPARE_CPUS},  # a whole CPU would wait until inference is over
    )

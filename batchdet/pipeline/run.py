"""The Ray Data job: listing → read → prepare → inference → Parquet, in one function."""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from batchdet.output.content import ContentIndex
from batchdet.pipeline.plan import RunPlan
from batchdet.pipeline.stages import InferenceStage, read_batch
from batchdet.errors import TaskFailed
from batchdet.progress import Progress, Reporter

log = logging.getLogger("batchdet")

#: Logical CPUs a read or write task asks for: they wait on storage, not the
#: CPU. An actor running N onnxruntime threads asks Ray for N - IO_CPUS,
#: which leaves a task's slice free per actor beside actors that fill a
#: node: full CPUs for both would deadlock a node (the actors waiting for
#: input no task can be scheduled to produce).
IO_CPUS = 0.25
#: Write tasks at once (they ask for no CPU, so this bounds them): Parquet
#: files of a block's rows take milliseconds to encode and store.
WRITE_TASKS = 2
#: Blocks each actor should see over a run at the least: small runs of slow
#: models get small blocks, so that the last ones spread over the actors.
BLOCKS_PER_ACTOR = 4
#: Images in a block at the most. A block's fixed cost (a task, a hand-off to
#: an actor, a write) is a few milliseconds: at 64 images it is under 1 % of
#: even a ~1 ms model's work; larger blocks only lose more on a kill.
MAX_BLOCK = 64
#: Encoded bytes per image the object-store cap below is sized by: a large
#: photograph; smaller files simply let more images wait.
BYTES_PER_IMAGE = 1 << 20
#: Blocks that may wait in the object store per inference actor. Reading is
#: far faster than inference, so without a cap every file of the dataset is
#: read at once and waits (memory growing with the dataset); Ray Data splits
#: the cap among its operators, and a share smaller than a block starves the
#: actors (docs/notes/2026-12-02-fast-models.md).
PREFETCH_BLOCKS_PER_ACTOR = 4


#: Ray node settings batchdet starts its embedded Ray with, and which a
#: cluster's nodes should have too (as ``RAY_<name>`` environment variables of
#: ``ray start``: :func:`node_environment`; infra/docker/Dockerfile sets them).
#: Ray kills idle workers beyond one per CPU after 1 s; quarter-CPU tasks
#: seconds apart then each start a new Python worker (~1.5 s of CPU taken
#: from the model). A minute keeps them warm between blocks and still reaps
#: them after the run (measured: docs/notes/2026-11-performance-history.md, "What costs throughput" 2).
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
    with _sigterm_kept():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(**local_ray_options())
        try:
            yield not address
        finally:
            if not address:
                ray.shutdown()


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """The caller's SIGTERM handler back after the block. ``ray.init`` sets its
    own (``sys.exit``, so that Ray shuts down cleanly) and never puts the old
    one back; it stays Ray's while the run needs it, not after."""
    main = threading.current_thread() is threading.main_thread()  # only the main thread sets handlers
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and saved is not None:
            signal.signal(signal.SIGTERM, saved)


@contextlib.contextmanager
def ray_console_to(log: Path | None) -> Iterator[None]:
    """Ray's and Ray Data's console log lines go to ``log`` while the job
    runs, then back to where they went (None: left where they are).

    Ray attaches a handler on stderr to its ``ray`` logger at import, and Ray
    Data one to ``ray.data``: a job started from a library call would put
    Ray's start-up, its warnings and Ray Data's execution lines on the
    caller's terminal. Only those handlers' streams are swapped, not their
    levels or formats, so the file reads as the terminal would have. (Ray's
    C++ core writes its own lines to the process's stderr; only the CLI,
    which owns its process, redirects that.)"""
    importlib.import_module("ray.data")  # Ray and Ray Data attach their handlers at import

    if log is None:
        yield
        return
    with open(log, "a", buffering=1, encoding="utf-8") as f:
        swapped = [(h, _set_stream(h, f)) for h in ray_console_handlers()]
        try:
            yield
        finally:
            for handler, stream in swapped:
                _set_stream(handler, stream)


def _set_stream(handler: logging.StreamHandler, stream):
    """Point ``handler`` at ``stream``; return its old one. (Not
    ``setStream``: it flushes the old stream, which may be closed, e.g. a
    test's captured stderr that Ray's handler still holds.)"""
    with handler.lock:
        old, handler.stream = handler.stream, stream
    return old


def ray_console_handlers() -> list[logging.StreamHandler]:
    """The stream (not file) handlers Ray made on ``ray`` and the loggers under
    it, each once (a caller's own handlers there are left alone)."""
    names = ["ray"] + [name for name in logging.root.manager.loggerDict if name.startswith("ray.")]
    found = {id(h): h for name in names for h in logging.getLogger(name).handlers
             if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
             and type(h).__module__.startswith("ray.")}
    return list(found.values())


def actor_layout(plan: RunPlan, local: bool) -> tuple[int, tuple[int, int]]:
    """(threads per actor, (min, max) actors) for the cluster Ray sees.

    By default a CPU actor runs one onnxruntime thread, one actor per CPU.
    In a multi-threaded session a thread preempted by any other process
    (Ray's own wake hundreds of times a second) stalls its peers at every
    operator's end; single-threaded sessions lose only their own time. On
    2 cores: +7.6 % in steady state over one 2-thread actor (0.425 against
    0.395 images/s, two runs each), +2.5–4 % end to end at 40 images, for
    ~0.5 GB per extra actor (docs/notes/2026-11-performance-history.md, "What costs throughput" 3). A GPU
    actor's threads only feed its device: the node's CPUs, up to 4. On the
    embedded Ray the pool starts at its maximum: Ray Data adds actors only
    when their input queue builds up, which for a small dataset it never does.
    """
    import ray

    o = plan.options
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_node = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]) or 1
    threads = o.threads_per_actor or (min(per_node, 4) if o.gpus_per_actor else 1)
    gpus = ray.cluster_resources().get("GPU", 0)
    # Ray would wait forever for an actor no node can hold. On the embedded
    # Ray nothing will ever add a node, so refuse; on a cluster an autoscaler
    # may still bring one (a GPU group scaled to zero), so only warn.
    problems = [f"--threads-per-actor {threads} exceeds the largest node's {per_node} CPUs"] * (threads > per_node)
    problems += [f"--gpus-per-actor {o.gpus_per_actor} but the cluster has {gpus:g} GPUs now"] * (
        o.gpus_per_actor > gpus)
    for problem in problems:
        if local:
            raise ValueError(problem)
        log.warning("%s; waiting for the autoscaler to add a node that fits", problem)
    high = max(1, cpus // threads)
    if o.gpus_per_actor:
        high = min(high, max(1, int(gpus / o.gpus_per_actor)))
    return threads, o.actors or (high if local else 1, high)


def images_per_block(images: int, actors: int, gpus: float = 0.0) -> int:
    """Block size for ``images`` over ``actors``: at least BLOCKS_PER_ACTOR
    blocks each, at most MAX_BLOCK images (4× that on a GPU, which does a
    CPU's block in milliseconds)."""
    most = MAX_BLOCK * (4 if gpus else 1)
    return max(1, min(most, -(-images // (max(actors, 1) * BLOCKS_PER_ACTOR))))


def run_pipeline(plan: RunPlan, local: bool = True, on_progress: Callable[[Progress], None] | None = None,
                 known: ContentIndex | None = None) -> dict[str, float | None]:
    """Stream every listed image through the model into staged Parquet
    (``local``: on an embedded Ray that no autoscaler will grow), telling
    ``on_progress`` how far it is about once a second; bytes ``known`` to
    have an ``ok`` row in the output get it copied instead of a model run. Raises
    :class:`batchdet.progress.Stalled` when no image finishes for
    ``plan.options.stall_timeout`` seconds (or 4× the longest gap between blocks).
    Returns its timings: when the first actor had its model loaded
    (``model_loaded``) and the first block finished (``first_result``), epoch
    seconds, None if not reached or nobody watched."""
    threads, (low, high) = actor_layout(plan, local)
    block = plan.options.batch_size or images_per_block(plan.num_images, high, plan.options.gpus_per_actor)
    # no more actors than blocks: an actor with nothing to do still loads the model
    high = min(high, -(-plan.num_images // block))
    low = min(low, high)
    reporter = Reporter(plan.num_images, on_progress, plan.options.stall_timeout)
    try:
        with job_context(object_store_cap(high, block)):
            reporter.run(lambda counter: _stream(plan, threads, low, high, block, counter, known))
    except Exception as e:
        cause = root_cause(e)
        if cause is e:
            raise
        raise TaskFailed(cause) from cause
    return reporter.timings()


def root_cause(error: BaseException) -> BaseException:
    """What a Ray task or actor raised, out of the wrappers Ray and Ray Data put
    around it on the way to the driver (``RayTaskError``, ``UserCodeException``,
    ``RayActorError``); ``error`` itself when it is no such wrapper."""
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import RayError, RayTaskError

    seen: set[int] = set()
    while id(error) not in seen and isinstance(error, (RayError, UserCodeException)):
        seen.add(id(error))
        inner = error.cause if isinstance(error, RayTaskError) else error.__cause__
        if inner is None or inner is error:
            break
        error = inner
    return error


def read_compute(actors: int, blocks: int | None = None):
    """Read tasks at once: two per actor, no more than there are ``blocks``.
    Ray Data checks the object-store cap before it starts a task, not while
    the task runs, so every running read may land one more block on top of
    the cap; bounding them bounds that (each reads its block's files
    concurrently on object storage)."""
    import ray.data

    return ray.data.TaskPoolStrategy(size=max(1, min(2 * max(actors, 1), blocks or 2 * max(actors, 1))))


def object_store_cap(actors: int, block: int) -> int:
    """Bytes of read files Ray Data may hold for ``actors`` inference actors."""
    return max(actors, 2) * PREFETCH_BLOCKS_PER_ACTOR * block * BYTES_PER_IMAGE


#: Ray Data's own reports, off while batchdet's job runs: its progress bars
#: (or, off a terminal, a progress log line every few seconds) and the plan
#: printed as execution starts would flood the caller's stderr; batchdet
#: reports progress itself (``on_progress``).
QUIET = {"enable_progress_bars": False, "print_on_execution_start": False}


@contextlib.contextmanager
def job_context(cap: int) -> Iterator[None]:
    """Ray Data's process-global context as the job needs it while it runs —
    the object-store limit at most ``cap`` bytes, its reports :data:`QUIET` —
    and given back as it was. (Not ``DataContext.copy()``: its deepcopy sets
    Ray's deprecated fields again and warns about each.)"""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options
    saved_quiet = {name: getattr(ctx, name) for name in QUIET}
    options = copy.copy(saved)
    options.resource_limits = saved.resource_limits.copy(
        object_store_memory=min(saved.resource_limits.object_store_memory, cap))
    ctx.execution_options = options
    for name, value in QUIET.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        ctx.execution_options = saved
        for name, value in saved_quiet.items():
            setattr(ctx, name, value)


def listed_items(plan: RunPlan) -> pa.Table:
    """The images to process as the pipeline's first table: dataset, uri and
    the version token the listing gave (carried into each row)."""
    names, uris, versions = [], [], []
    for name, listing in plan.listings.items():
        names += [name] * len(listing.uris)
        uris += listing.uris
        versions += listing.versions if listing.versions is not None else [None] * len(listing.uris)
    return pa.table({"dataset": pa.array(names, pa.string()), "uri": pa.array(uris, pa.string()),
                     "version": pa.array(versions, pa.string())})


def _stream(plan: RunPlan, threads: int, low: int, high: int, block: int, progress=None,
            known: ContentIndex | None = None) -> None:
    """The job itself, read top to bottom."""
    import ray
    import ray.data

    from batchdet.pipeline.sink import StagingSink

    o = plan.options
    items = listed_items(plan)
    blocks = [items.slice(start, block) for start in range(0, items.num_rows, block)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        read_batch, fn_kwargs={"storage_options": o.storage_options, "progress": progress},
        batch_format="pyarrow", batch_size=block, num_cpus=IO_CPUS, compute=read_compute(high, len(blocks)),
    )
    ds = ds.map_batches(
        InferenceStage,
        fn_constructor_kwargs={
            "model_path": plan.model.path, "run_id": plan.run_id, "threads": threads,
            "gpus": o.gpus_per_actor, "score_threshold": o.score_threshold, "max_pixels": o.max_pixels,
            # a GPU actor decodes on its other CPUs while the device runs
            "prepare_threads": max(1, threads - 1) if o.gpus_per_actor else 0,
            "storage_options": o.storage_options,  # for a URL model: each node fetches its own copy
            "progress": progress,
            # once in the object store for every actor; in a list, so that it reaches them unresolved
            "known": None if known is None else [ray.put(known)], "output": o.output, "own_process": True,
            "choice": plan.choice,
        },
        batch_format="pyarrow", batch_size=block,
        # one block at a time per CPU actor: the first actor up cannot hoard
        # blocks its peers then wait for; a GPU actor keeps a second one queued
        compute=ray.data.ActorPoolStrategy(
            min_size=low, max_size=high, max_tasks_in_flight_per_actor=2 if o.gpus_per_actor else 1),
        num_cpus=threads - IO_CPUS, num_gpus=o.gpus_per_actor or None,
    )
    ds.write_datasink(
        StagingSink(o.output, o.storage_options, plan.run_id, o.rows_per_file),
        # no CPU of its own: with any, Ray Data's budget lets reads and actors
        # take it and the finished rows wait unwritten (lost to a kill, a stall)
        ray_remote_args={"num_cpus": 0}, concurrency=min(WRITE_TASKS, len(blocks)),
    )

"""The job in the driver's own process: a small local set without Ray's start-up.

The same stages as the Ray job (:mod:`batchdet.pipeline.run`), the same
staging, commit, lease, manifest and watchdog (``api.run`` around both); only
the engine differs: one thread reads blocks a few ahead, one thread per
onnxruntime session runs them (sessions release the GIL, and Pillow and
OpenCV decode without it), and the driver's job thread stages their rows.

Ray's embedded start (a raylet, workers, the actors' own imports and
sessions) costs seconds that a run of a few images never earns back; a run
that is or may become big (an ``--address``, ``$RAY_ADDRESS``, a Ray this
process already joined, more than :data:`MAX_IN_PROCESS_IMAGES`) goes through
Ray Data (docs/notes/2026-12-04-small-runs.md).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from typing import Callable

import pyarrow as pa

from batchdet.errors import TaskFailed
from batchdet.options import DetectOptions
from batchdet.output.content import ContentIndex
from batchdet.output.layout import Output
from batchdet.pipeline.plan import RunPlan
from batchdet.pipeline.run import images_per_block, listed_items
from batchdet.pipeline.stages import InferenceStage, read_batch
from batchdet.pipeline.writing import stage_rows
from batchdet.progress import Counter, Halt, Progress, Reporter, Stalled

#: Images to process (after ``--resume``'s plan) above which
#: ``execution="auto"`` hands a run to Ray Data: where Ray's ~15 s start is
#: under a tenth of a full-model run on 2 cores, and a run goes where it can
#: grow (more cores and nodes, retried actors, reads in their own processes).
#: In-process is no slower at any size measured on one machine
#: (benchmarks/README.md, "Small runs").
MAX_IN_PROCESS_IMAGES = 64
#: Seconds a halted or failed run waits for its inference threads to finish
#: their block (the rows are staged for ``--resume``) before it returns
#: without them; they stop after it, their rows redone by ``--resume``.
JOIN_S = 10.0


def choose_execution(o: DetectOptions, images: int) -> str:
    """``"in-process"`` or ``"ray"`` for a run of ``images`` images with
    options ``o`` (their ``execution`` decides unless it is ``"auto"``)."""
    if o.execution != "auto":
        if o.execution == "in-process":
            check_pixel_limit(o.max_pixels)
        return o.execution
    ray = sys.modules.get("ray")
    joined = ray is not None and ray.is_initialized()  # the caller's own Ray: its cluster, its choice
    if o.address or os.environ.get("RAY_ADDRESS") or joined or images > MAX_IN_PROCESS_IMAGES:
        return "ray"
    try:
        check_pixel_limit(o.max_pixels)
    except ValueError:
        return "ray"
    return "in-process"


def check_pixel_limit(max_pixels: int) -> None:
    """Refuse a ``max_pixels`` above what Pillow's guard lets this process
    decode: in-process, the caller's guard is left as it is (an actor's is
    ours to switch off), and rows must not depend on where they ran."""
    from PIL import Image

    guard = Image.MAX_IMAGE_PIXELS
    if guard is not None and max_pixels > 2 * guard:  # Pillow errors above twice its limit
        raise ValueError(f"--max-pixels {max_pixels:,} exceeds Pillow's limit of {2 * guard:,} pixels in this "
                         "process (PIL.Image.MAX_IMAGE_PIXELS): run with --execution ray, or raise that limit")


def layout(images: int, cpus: int, threads: int | None, actors: int | None, gpus: float) -> tuple[int, int]:
    """(sessions, threads per session) on ``cpus`` CPUs: one single-threaded
    session per CPU as the Ray job's actors (``threads``/``actors`` given:
    as they say), but never more sessions than images, the CPUs shared among
    the fewer (a 1-image run gets one session with every CPU). One session on a GPU."""
    if gpus:
        return 1, threads or min(cpus, 4)
    if threads:
        return actors or max(1, cpus // threads), threads
    sessions = actors or max(1, min(cpus, images))
    return sessions, max(1, cpus // sessions)


def run_in_process(plan: RunPlan, on_progress: Callable[[Progress], None] | None = None,
                   known: ContentIndex | None = None) -> dict[str, float | None]:
    """Stream every listed image through the model into staged Parquet, here.
    Same contract as :func:`batchdet.pipeline.run.run_pipeline`; returns its
    timings (``model_loaded``, ``first_result``: epoch seconds, None if not reached)."""
    o = plan.options
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sessions, threads = layout(plan.num_images, cpus, o.threads_per_actor, o.actors and o.actors[1],
                               o.gpus_per_actor)
    block = o.batch_size or images_per_block(plan.num_images, sessions, o.gpus_per_actor)
    reporter = Reporter(plan.num_images, on_progress, o.stall_timeout, counter=Counter)
    try:
        reporter.run(lambda counter: _stream(plan, sessions, threads, block, counter, known))
    except Stalled:
        raise
    except Exception as e:  # a stage's failure, reported as the Ray job reports a task's
        raise TaskFailed(e) from e
    return reporter.timings()


class _Threads:
    """The run's threads: each one's first error stops them all."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: dict[str, threading.Thread] = {}

    def start(self, name: str, fn: Callable[[], None]) -> None:
        def body() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: B036 - handed to the job's thread
                self.errors.append(e)
                self.stop.set()

        thread = self.threads[name] = threading.Thread(target=body, name=f"batchdet-{name}", daemon=True)
        thread.start()

    def put(self, q: queue.Queue, item: object) -> bool:
        """Put ``item`` unless the run stops first (False)."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue) -> object:
        """The next item, or None once the run stops (or its writer is done: a None in ``q``)."""
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads.values())

    def close(self, deadline: float) -> None:
        """Stop them; wait until ``deadline`` (time.monotonic()) for the
        inference threads, never for the reader (a read stuck in the kernel never returns)."""
        self.stop.set()
        for name, t in self.threads.items():
            if name != "read":
                t.join(max(0.0, deadline - time.monotonic()))


def _stream(plan: RunPlan, sessions: int, threads: int, block: int, counter: Counter | None,
            known: ContentIndex | None) -> None:
    """The job itself: a reader, ``sessions`` inference threads, the rows staged here."""
    o = plan.options
    items = listed_items(plan)
    blocks = [items.slice(start, block) for start in range(0, items.num_rows, block)]
    read: queue.Queue = queue.Queue(maxsize=2 * sessions)  # blocks read ahead: bounded, as Ray's object store is
    done: queue.Queue = queue.Queue()
    run = _Threads()

    def reader() -> None:
        for b in blocks:
            if not run.put(read, read_batch(b, o.storage_options, counter)):
                return
        for _ in range(sessions):
            run.put(read, None)

    def inference() -> None:
        stage = InferenceStage(plan.model.path, plan.run_id, threads=threads, gpus=o.gpus_per_actor,
                               score_threshold=o.score_threshold, max_pixels=o.max_pixels,
                               prepare_threads=max(1, threads - 1) if o.gpus_per_actor else 0,
                               storage_options=o.storage_options, progress=counter, known=known,
                               output=o.output, choice=plan.choice)
        while (batch := run.get(read)) is not None:
            done.put(stage(batch))

    out = Output(o.output, o.storage_options)
    pending: list[pa.Table] = []
    try:
        run.start("read", reader)
        for i in range(sessions):
            run.start(f"inference-{i}", inference)
        while (run.alive() and not run.stop.is_set()) or not done.empty():  # stopped: a thread failed
            try:
                pending.append(done.get(timeout=0.1))  # a timed wait: a halt lands here
            except queue.Empty:
                continue
            if sum(t.num_rows for t in pending) >= o.rows_per_file:
                stage_rows(out, plan.run_id, pa.concat_tables(pending))
                pending = []
        if run.errors:
            raise run.errors[0]
    finally:
        _wind_up(run, done, pending, lambda table: stage_rows(out, plan.run_id, table))


def _wind_up(run: _Threads, done: queue.Queue, pending: list[pa.Table], stage: Callable[[pa.Table], None]) -> None:
    """Stop the threads and stage every row finished, however the run ends
    (a halt, an error): kept for ``--resume``. A halt repeated meanwhile (the
    watchdog's, a second Ctrl-C's) starts the wind-up again, never skips it;
    a block staged twice loses its second copy at commit."""
    deadline = time.monotonic() + JOIN_S
    while True:
        try:
            run.close(deadline)
            while not done.empty():
                pending.append(done.get_nowait())
            if pending:
                stage(pa.concat_tables(pending))
            return
        except Halt:
            continue

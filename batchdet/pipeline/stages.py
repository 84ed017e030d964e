"""The pipeline's per-batch stages as plain functions over Arrow tables.

Ray Data calls them on blocks; tests call them directly. Each stage passes
per-image failures along in the ``error`` column instead of raising, so one
bad file becomes one error row and never a failed task.

Columns along the way:
  listing   → dataset, uri, version (the store's token, as listed)
  read      → + data (the file's bytes, null on error), size, sha256, error
  inference → the contract's row (schema.SCHEMA)

Only the encoded files cross Ray's object store (a JPEG is ~50–500 KB); the
inference actor decodes, resizes, normalises, runs the model and builds its
output columns itself. Handing even 4.3 MB of resized bytes per image from
preprocessing tasks to the actors cost more CPU than a fast model's whole
inference (docs/notes/2026-12-02-fast-models.md); the model's input is 17 MB.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from batchdet.model.spec import INPUT_SIZE, NMS_SCORE_THRESHOLD
from batchdet.options import DEFAULT_MAX_PIXELS
from batchdet.output.content import ContentIndex, RowReader
from batchdet.output.layout import Output
from batchdet.output.schema import SCHEMA, STATUS_ERROR, STATUS_OK
from batchdet.pipeline.detector import Detector
from batchdet.pipeline.postprocess import detections_column, selected_from
from batchdet.pipeline.precision import DEFAULT_CHOICE, Choice
from batchdet.pipeline.preprocess import ImageError, Prepared, own_pixel_limit, prepare
from batchdet.pipeline.reading import read_many


def _errors(batch: pa.Table) -> list[str | None]:
    return batch.column("error").to_pylist() if "error" in batch.column_names else [None] * batch.num_rows


def read_batch(batch: pa.Table, storage_options: dict[str, Any] | None = None, progress: Any = None) -> pa.Table:
    """Add each URI's bytes (``data``), their ``size`` and ``sha256`` (hashed
    here, where the bytes already are: the row's content identity), or its
    read error; tell ``progress`` (a :class:`batchdet.progress.Counter` or its
    actor's client, or None) how many were read."""
    results = read_many(batch.column("uri").to_pylist(), storage_options)
    if progress is not None:
        progress.add_read(batch.num_rows)
    data = [r if isinstance(r, bytes) else None for r in results]
    errors = [str(r) if isinstance(r, ImageError) else None for r in results]
    return (batch.append_column("data", pa.array(data, pa.large_binary()))
            .append_column("size", pa.array([None if d is None else len(d) for d in data], pa.int64()))
            .append_column("sha256", pa.array([None if d is None else hashlib.sha256(d).hexdigest() for d in data],
                                              pa.string()))
            .append_column("error", pa.array(errors, pa.string())))


class InferenceStage:
    """One model session per actor (onnxruntime or OpenVINO), loaded once; each block of files is
    decoded, resized, normalised, run image by image (the MLPerf file's batch
    axis is fixed to 1) and turned into output columns.

    Bytes whose sha256 already has a result are not run again: those of an
    ``ok`` row of the output (``known``, a :class:`ContentIndex` in Ray's object
    store, rows read from ``output``), and those this actor ran lately
    (:data:`RECENT`); the row is a copy, naming its source in ``copied_from``.

    A GPU actor prepares inputs on ``prepare_threads`` threads ahead of the device
    (Pillow and OpenCV release the GIL), so the device does not wait for the
    CPU; a CPU actor prepares them on its own thread, into one reused buffer,
    between runs (its cores are the model's anyway).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        run_id: str,
        threads: int | None = None,
        gpus: float = 0.0,
        score_threshold: float = NMS_SCORE_THRESHOLD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        prepare_threads: int = 0,
        storage_options: dict[str, Any] | None = None,
        progress: Any = None,
        known: Any = None,
        output: str | None = None,
        own_process: bool = False,
        choice: Choice = DEFAULT_CHOICE,
    ):
        """``progress``: a :class:`batchdet.progress.Counter` (or its actor's client) told
        when the model is loaded and of each finished block, or None.
        ``known``: a :class:`ContentIndex`, or a one-element list holding its Ray object
        reference (a list, so that Ray hands the reference over unresolved), with
        ``output`` the output it indexes; None: nothing known yet. ``own_process``:
        the actor's process is batchdet's alone (a Ray actor), so Pillow's
        process-wide bomb guard may give way to ``max_pixels``. ``choice``: the
        engine and precision the plan chose (:func:`batchdet.pipeline.precision.choose`)."""
        from batchdet.model.distribution import local_model

        if own_process:
            own_pixel_limit()
        # A URL#sha256= model: this node's cached, verified copy (fetched once per node); a path: itself.
        model_path = local_model(model_path, storage_options=storage_options)
        # the driver checked the model before the run (plan_run); a URL model was verified by its sha256
        self.detector = Detector(model_path, threads=threads, gpus=gpus, score_threshold=score_threshold,
                                 max_pixels=max_pixels, checked=True, choice=choice)
        self.run_id = run_id
        self._input = np.empty((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)  # the sequential path's reused input
        self.prepare_threads = prepare_threads
        self._pool = ThreadPoolExecutor(prepare_threads) if prepare_threads > 0 else None
        # the pool's inputs, in turn: 2 per thread prepared ahead, and the one the model is running on
        self._inputs = [np.empty_like(self._input) for _ in range(2 * prepare_threads + 1)] if self._pool else []
        self.progress = progress
        if isinstance(known, list):
            import ray

            known = ray.get(known[0])
        self.known: ContentIndex | None = known if known is not None and len(known) else None
        self.rows = RowReader(Output(output, storage_options)) if self.known is not None else None
        self.recent: collections.OrderedDict[str, tuple[str, int, int, tuple]] = collections.OrderedDict()
        if progress is not None:
            progress.add_loaded()

    def _prepared(self, datas: list[bytes | None]) -> Iterator[Prepared | ImageError | None]:
        """Each file made the model's input, in order: an ImageError in place of a bad one."""

        def one(data: bytes | None, out: np.ndarray | None = None) -> Prepared | ImageError | None:
            if data is None:
                return None
            try:
                return prepare(data, self.detector.max_pixels, out=out)
            except ImageError as e:
                return e

        if self._pool is None:
            return (one(d, self._input) for d in datas)
        return _ahead(self._pool, lambda pair: one(*pair), zip(datas, itertools.cycle(self._inputs)),
                      len(self._inputs) - 1)

    def _copy(self, sha256: str) -> tuple[str, int, int, tuple] | None:
        """(source uri, width, height, selected) of a result for these bytes, or None."""
        if sha256 in self.recent:
            return self.recent[sha256]
        where = self.known.find(sha256) if self.known is not None else None
        if where is None:
            return None
        row = self.rows.row(*where)
        return row["uri"], row["width"].as_py(), row["height"].as_py(), selected_from(row["detections"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = _errors(batch)
        shas = batch.column("sha256").to_pylist()
        datas = [d if e is None else None for d, e in zip(batch.column("data").to_pylist(), errors)]
        widths: list[int | None] = [None] * batch.num_rows
        heights: list[int | None] = [None] * batch.num_rows
        selected: list[tuple | None] = [None] * batch.num_rows
        copied: list[str | None] = [None] * batch.num_rows
        for i, data in enumerate(datas):
            source = self._copy(shas[i]) if data is not None else None
            if source is not None:
                copied[i], widths[i], heights[i], selected[i] = source
                datas[i] = None  # not decoded, not run
        uris = batch.column("uri").to_pylist()
        for i, p in enumerate(self._prepared(datas)):
            if isinstance(p, ImageError):
                errors[i] = str(p)
            elif p is not None:
                source = self.recent.get(shas[i])  # the same bytes twice in this block: the first one ran
                if source is not None:
                    copied[i], widths[i], heights[i], selected[i] = source
                    continue
                try:
                    selected[i] = self.detector.select(p.tensor, p.width, p.height)
                    widths[i], heights[i] = p.width, p.height
                    self._remember(shas[i], (uris[i], p.width, p.height, selected[i]))
                except ValueError as e:  # a model emitting labels outside the contract
                    errors[i] = f"ModelOutputError: {e}"
        if self.progress is not None:
            self.progress.add(batch.num_rows, sum(e is not None for e in errors))
        return results_table(batch, widths, heights, errors, selected, self.run_id, copied)

    def _remember(self, sha256: str, result: tuple[str, int, int, tuple]) -> None:
        self.recent[sha256] = result
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)


#: Results an actor keeps by sha256, so the same bytes met again (a copied
#: file in the same run) are copied rather than run: a few KB each.
RECENT = 1024


def _column(batch: pa.Table, name: str, kind: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """``batch``'s column ``name``, or nulls where an earlier stage did not add it."""
    return batch.column(name) if name in batch.column_names else pa.nulls(batch.num_rows, kind)


def _ahead(pool: ThreadPoolExecutor, fn, items: Iterable, depth: int) -> Iterator:
    """``map(fn, items)`` on ``pool``, in order, at most ``depth`` items ahead
    of the consumer: a block of 256 images must not all sit prepared (17 MB
    each) while the device works through them. An item is submitted only once
    the consumer has asked for the one after the item ``depth + 1`` before it,
    so ``depth + 1`` buffers taken in turn are never overwritten in use."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def results_table(batch: pa.Table, widths: list, heights: list, errors: list, selected: list, run_id: str,
                  copied: list | None = None) -> pa.Table:
    """The contract's rows for a block, column by column (no per-row dicts)."""
    ok = [e is None for e in errors]
    n = batch.num_rows
    return pa.table(
        {
            "uri": batch.column("uri"),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "status": pa.array([STATUS_OK if k else STATUS_ERROR for k in ok], pa.string()),
            "error": pa.array(errors, pa.string()),
            "detections": detections_column([s if k else None for s, k in zip(selected, ok)]),
            "run_id": pa.array([run_id] * n, pa.string()),
            "size": _column(batch, "size", pa.int64()),
            "sha256": _column(batch, "sha256", pa.string()),
            "version": _column(batch, "version", pa.string()),
            "copied_from": pa.array(copied or [None] * n, pa.string()),
            "dataset": batch.column("dataset"),
        },
        schema=SCHEMA,
    )

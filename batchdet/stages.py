"""The pipeline's per-batch stages as plain functions over Arrow tables.

Ray Data calls them on blocks; tests call them directly. Each stage passes
per-image failures along in the ``error`` column instead of raising, so one
bad file becomes one error row and never a failed task.

Columns along the way:
  listing   → dataset, uri
  read      → + data (bytes, null on error), error
  prepare   → dataset, uri, image (3×1200×1200 uint8 planes, null on error), width, height, error
  inference → the contract's row (schema.SCHEMA)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from batchdet.detector import Detector
from batchdet.preprocess import DEFAULT_MAX_PIXELS, ImageError, prepare
from batchdet.reading import read_many
from batchdet.schema import SCHEMA, STATUS_ERROR, STATUS_OK
from batchdet.spec import INPUT_SIZE, NMS_SCORE_THRESHOLD

IMAGE_SHAPE = (3, INPUT_SIZE, INPUT_SIZE)  # planar RGB
IMAGE_BYTES = 3 * INPUT_SIZE * INPUT_SIZE  # 4.32 MB: what one image costs the object store


def _errors(batch: pa.Table) -> list[str | None]:
    return batch.column("error").to_pylist() if "error" in batch.column_names else [None] * batch.num_rows


def read_batch(batch: pa.Table, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Add each URI's bytes (``data``) or its read error."""
    results = read_many(batch.column("uri").to_pylist(), storage_options)
    data = [r if isinstance(r, bytes) else None for r in results]
    errors = [str(r) if isinstance(r, ImageError) else None for r in results]
    return batch.append_column("data", pa.array(data, pa.large_binary())).append_column(
        "error", pa.array(errors, pa.string())
    )


def prepare_batch(batch: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Decode, orient and resize each image to 3×1200×1200 uint8; ``data`` is dropped.

    The resized pixels travel as raw bytes (4.32 MB an image), a quarter of
    the float32 tensor the model finally sees. Each image is resized straight
    into one buffer that becomes the ``image`` column as it is: building the
    column from per-image ``bytes`` copied every image twice more, and the
    stage took 12.6 ms an image instead of 7.7 (benchmarks/bench.py).
    """
    pixels = np.empty((batch.num_rows, *IMAGE_SHAPE), np.uint8)
    widths, heights, errors, valid = [], [], [], []
    done = 0  # images resized so far: the next one goes to pixels[done]
    for data, error in zip(batch.column("data").to_pylist(), _errors(batch)):
        width = height = None
        if error is None:
            try:
                p = prepare(data, max_pixels, out=pixels[done])
                width, height, done = p.width, p.height, done + 1
            except ImageError as e:
                error = str(e)
        widths.append(width)
        heights.append(height)
        errors.append(error)
        valid.append(error is None)
    return pa.table(
        {
            "dataset": batch.column("dataset"),
            "uri": batch.column("uri"),
            "image": image_column(pixels[:done], valid),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "error": pa.array(errors, pa.string()),
        }
    )


def image_column(pixels: np.ndarray, valid: list[bool]) -> pa.Array:
    """The ``image`` column over ``pixels`` (the valid rows' images back to
    back) without copying them: Arrow large_binary from its buffers, a
    validity bitmap, int64 offsets and the pixels; a failed row takes no bytes."""
    offsets = np.concatenate([[0], np.cumsum(np.array(valid, np.int64) * IMAGE_BYTES)])
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(valid), [pa.array(valid, pa.bool_()).buffers()[1], pa.py_buffer(offsets), pa.py_buffer(pixels)])


class InferenceStage:
    """One onnxruntime session per actor, loaded once, run image by image
    (the MLPerf file's batch axis is fixed to 1)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        run_id: str,
        threads: int | None = None,
        gpus: float = 0.0,
        score_threshold: float = NMS_SCORE_THRESHOLD,
        storage_options: dict[str, Any] | None = None,
    ):
        from batchdet.distribution import local_model

        # A URL#sha256= model: this node's cached, verified copy (fetched once per node); a path: itself.
        model_path = local_model(model_path, storage_options=storage_options)
        self.detector = Detector(model_path, threads=threads, gpus=gpus, score_threshold=score_threshold)
        self.run_id = run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        images = batch.column("image")
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        for i, error in enumerate(_errors(batch)):
            detections = None
            if error is None:
                try:
                    image = np.frombuffer(images[i].as_buffer(), dtype=np.uint8).reshape(IMAGE_SHAPE)
                    detections = self.detector.detect_prepared(image, widths[i], heights[i]).detections
                except ValueError as e:  # a model emitting labels outside the contract
                    error = f"ModelOutputError: {e}"
            ok = error is None
            rows.append(
                {
                    "uri": batch.column("uri")[i].as_py(),
                    "width": widths[i] if ok else None,
                    "height": heights[i] if ok else None,
                    "status": STATUS_OK if ok else STATUS_ERROR,
                    "error": error,
                    "detections": detections,
                    "run_id": self.run_id,
                    "dataset": batch.column("dataset")[i].as_py(),
                }
            )
        return pa.Table.from_pylist(rows, schema=SCHEMA)

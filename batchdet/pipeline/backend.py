"""The backend a :class:`batchdet.pipeline.precision.Choice` names, built (not yet loaded)."""

from __future__ import annotations

import os

from batchdet.options import OPENVINO
from batchdet.pipeline.precision import Choice


def make_backend(choice: Choice, model_path: str | os.PathLike, threads: int | None = None, gpus: float = 0.0,
                 checked: bool = False):
    """The backend ``choice`` names, not yet loaded: each has ``name``, ``version``,
    ``load()`` and ``predict()`` (:class:`batchdet.pipeline.inference.OnnxBackend`)."""
    if choice.engine == OPENVINO:
        from batchdet.pipeline.openvino_engine import OpenVinoBackend

        return OpenVinoBackend(model_path, threads, choice.precision, checked=checked)
    from batchdet.pipeline.inference import OnnxBackend

    return OnnxBackend(model_path, threads, gpus, checked=checked)

"""OpenVINO behind the backend interface of :class:`batchdet.pipeline.inference.OnnxBackend`.

OpenVINO is the runtime of the model card's own zoo; it reads the ONNX file
as it is (no conversion step) and is what runs bf16 on CPUs with AVX512_BF16
or AMX, where onnxruntime has no bf16 kernels. Both engines take the same float
tensor (:func:`batchdet.pipeline.preprocess.prepare`'s).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator

import numpy as np

from batchdet.cpu import present
from batchdet.model.spec import check_model
from batchdet.options import BF16, FP32, INT8
from batchdet.pipeline.inference import OUTPUTS, RawDetections, optimized_cache_dir
from batchdet.pipeline.precision import BF16_FLAGS, check_bf16_cpu, openvino_version

#: OpenVINO's ``INFERENCE_PRECISION_HINT`` for each precision. fp32 must be
#: asked for: on a bf16-capable CPU OpenVINO's default is bf16. An INT8 copy
#: runs its quantized convolutions in int8 and the rest (decode, NMS) in f32,
#: as onnxruntime runs it.
INFERENCE_PRECISION = {FP32: "f32", BF16: "bf16", INT8: "f32"}
#: One model load at a time in a process: OpenVINO's reader sets the C
#: locale and puts the old one back around its work, so two loads on two
#: threads (the in-process engine's sessions) could leave the caller's
#: process in the "C" locale (its default text encoding then ASCII).
_LOADING = threading.Lock()


class _StackT(ctypes.Structure):
    """C's ``stack_t``, as ``sigaltstack(2)`` reads and writes it."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def _signal_stack_kept() -> Iterator[None]:
    """The calling thread's alternate signal stack as it was, after the block.

    Compiling a model points the thread's signal stack at memory of
    OpenVINO's, which it may free later without pointing it back: the next
    signal handled on that thread (the caller's Ctrl-C, on its main thread)
    then kills the process with SIGSEGV. Found by the test suite; see
    docs/notes/2026-12-04-precision.md. No-op where libc has no sigaltstack.
    """
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "sigaltstack"):
        yield
        return
    saved = _StackT()
    libc.sigaltstack(None, ctypes.byref(saved))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


class OpenVinoBackend:
    """name, version, load, predict (as :class:`~batchdet.pipeline.inference.OnnxBackend`); CPU only."""

    name = "openvino"

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None, precision: str = FP32,
                 checked: bool = False):
        """``precision``: one of :data:`INFERENCE_PRECISION`'s keys; ``checked``:
        as :class:`~batchdet.pipeline.inference.OnnxBackend`'s."""
        if precision not in INFERENCE_PRECISION:
            raise ValueError(f"OpenVINO precision must be one of {sorted(INFERENCE_PRECISION)}, got {precision!r}")
        self.model_path = str(model_path)
        self.threads = threads or os.cpu_count() or 1
        self.precision = precision
        self.checked = checked
        self.compiled = None
        self._request = None

    @property
    def version(self) -> str:
        """The package's version (``2026.4.1``; the module's own names the build too)."""
        return openvino_version() or "not installed"

    def load(self) -> "OpenVinoBackend":
        """Compile the model for this CPU at :attr:`precision`; ValueError (one line)
        where this node's CPU has no native bf16, or OpenVINO would not run it in bf16."""
        import openvino as ov

        if self.precision == BF16:
            check_bf16_cpu(present(BF16_FLAGS))  # this node's CPU, which need not be the driver's
        if not self.checked:
            check_model(self.model_path)
        config = {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",  # one image at a time, as the actors feed it
            # several actors share a node: pinned, each would put its threads on the same first cores
            "ENABLE_CPU_PINNING": False,
        }
        cache = optimized_cache_dir()
        if cache is not None:  # compiled blobs, keyed by OpenVINO on model, device and config
            config["CACHE_DIR"] = str(cache / "openvino")
        with _LOADING, _signal_stack_kept():
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(self.model_path), "CPU", config)
        got = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.precision == BF16 and "bf16" not in got:
            raise ValueError(f"OpenVINO {self.version} would run {self.model_path} in {got}, not bf16, on this CPU")
        self._request = self.compiled.create_infer_request()
        return self

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model, by name, for the float input ``x`` [1, 3, 1200, 1200]."""
        if self._request is None:
            self.load()
        results = self._request.infer({0: x})
        return {out.get_any_name(): np.asarray(results[out]) for out in self.compiled.outputs}

    def predict(self, x: np.ndarray) -> RawDetections:
        """The model's float input [1, 3, 1200, 1200] → raw detections."""
        outputs = self.run(x)
        bboxes, labels, scores = (outputs[name] for name in OUTPUTS)
        return RawDetections(bboxes[0], labels[0].astype(np.int64, copy=False), scores[0])

"""onnxruntime behind a small interface: load once, predict one image.

The backend takes the model's float32 input [1, 3, 1200, 1200] that
:func:`batchdet.pipeline.preprocess.prepare` makes in the same actor (into
a buffer the actor reuses) and runs the model as given, on the CPU or a GPU.

Session settings, providers and the optimized-model cache live here too; each
choice carries the effect it was measured to have (``benchmarks/``, see
docs/performance.md).
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from batchdet.files import AtomicFile, cache_root, sha256_of_file
from batchdet.model.spec import BBOXES, INPUT_NAME, LABELS, SCORES, check_model

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OUTPUTS = (BBOXES, LABELS, SCORES)

#: Environment switches (read in the actor process; a local Ray's workers
#: inherit the driver's environment, a remote cluster needs them in its
#: runtime_env). "0"/"false"/"no"/"off" switch a default off.
ENV_ORT_CACHE = "BATCHDET_ORT_CACHE"  # optimized-model cache: on (default), off, or a directory
ENV_TENSORRT = "BATCHDET_TENSORRT"  # use TensorRT EP when this build has it (default on)
ENV_FP16 = "BATCHDET_FP16"  # TensorRT FP16 kernels (default off: FP32 accuracy)
ENV_SPINNING = "BATCHDET_ORT_SPINNING"  # override the intra-op spinning default below


@dataclass(frozen=True)
class RawDetections:
    """One image's model outputs with the batch axis removed."""

    bboxes: np.ndarray  # float32 [N, 4], normalised x_min, y_min, x_max, y_max
    labels: np.ndarray  # int64 [N], class index 1..80
    scores: np.ndarray  # float32 [N]


# --- session options ----------------------------------------------------------
def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


#: Defaults of :func:`session_options`, each chosen by measurement
#: (benchmarks/session_options.py; the figures are in docs/performance.md,
#: "onnxruntime session settings"):
#:
#: * graph optimisation ORT_ENABLE_ALL: its NCHWc layout blocks the
#:   convolutions for the CPU's vector width.
#: * intra-op threads = the actor's CPUs, inter-op 1, sequential execution:
#:   the graph is a chain, nothing to run beside it.
#: * intra-op spinning on (onnxruntime's default): off made no difference;
#:   ``$BATCHDET_ORT_SPINNING=0`` turns it off anyway.
#: * CPU memory arena and memory pattern on: off saves some memory but often
#:   costs far more time (buffers faulted in again on every run).
DEFAULT_SPINNING = True


def session_options(
    threads: int,
    *,
    level: str = "all",
    spinning: bool | None = None,
    arena: bool = True,
    mem_pattern: bool = True,
    optimized_model_filepath: str | None = None,
):
    """The ``SessionOptions`` batchdet runs with (see the defaults' notes above).

    ``level`` is one of ``disable``, ``basic``, ``extended``, ``all``;
    ``spinning`` None means ``$BATCHDET_ORT_SPINNING``, else the default.
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if spinning is None:
        spinning = _env_flag(ENV_SPINNING, DEFAULT_SPINNING)
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = mem_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    if optimized_model_filepath:
        options.optimized_model_filepath = str(optimized_model_filepath)
    return options


# --- optimized-model cache -----------------------------------------------------
def cpu_fingerprint() -> str:
    """A short tag of this CPU: ORT_ENABLE_ALL bakes hardware-specific layouts
    (NCHWc block size follows AVX2/AVX-512) into the optimized graph."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # first processor's block is enough
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def optimized_cache_dir() -> Path | None:
    """Where optimized graphs are kept, or None when ``$BATCHDET_ORT_CACHE`` is off."""
    value = os.environ.get(ENV_ORT_CACHE, "").strip()
    if value.lower() in ("0", "false", "no", "off"):
        return None
    if value and value.lower() not in ("1", "true", "yes", "on"):
        return Path(value)
    return cache_root() / "ort-optimized"


def optimized_cache_path(cache_dir: Path, model_sha256: str, ort_version: str, level: str = "all") -> Path:
    """The cache file of one model × onnxruntime version × level × CPU."""
    key = f"{model_sha256[:24]}-ort{ort_version}-{level}-cpu{cpu_fingerprint()}"
    return cache_dir / f"{key}.onnx"


# --- execution providers ------------------------------------------------------------
def select_providers(gpus: float, available: Sequence[str], tensorrt: bool = True) -> list[str]:
    """Execution providers for an actor given its GPU share and what this
    onnxruntime build offers, best first. No GPU asked → CPU only (a CUDA
    build must not grab a device Ray did not give the actor). GPU asked but
    not available → ValueError, since silently running on CPU would be 50×
    slower. TensorRT goes first when the build has it and ``tensorrt`` is on;
    CUDA then takes what TensorRT cannot run, CPU what neither can."""
    if gpus <= 0:
        return [CPU]
    if CUDA not in available:
        raise ValueError(f"--gpus-per-actor {gpus} needs onnxruntime-gpu ({CUDA}); this build has {list(available)}")
    chosen = [TENSORRT] if tensorrt and TENSORRT in available else []
    return [*chosen, CUDA, CPU]


def provider_options(providers: Sequence[str], fp16: bool = False, cache_dir: Path | None = None) -> list[dict]:
    """Options for each provider of :func:`select_providers`, in order.

    * TensorRT: ``trt_fp16_enable`` with ``fp16`` (FP16 kernels: roughly 2×
      on Tensor-Core GPUs, accuracy to be checked with ``batchdet eval``);
      engines cached (``trt_engine_cache_*``) since building one for this
      model takes minutes and the cache makes the next actor start in seconds.
    * CUDA: device 0 (Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPU),
      exhaustive cuDNN algorithm search, paid once since the input shape
      never changes. FP16 with CUDA alone needs an FP16 model; the flag
      applies to TensorRT only.
    """
    options: list[dict] = []
    for name in providers:
        if name == TENSORRT:
            trt: dict = {"device_id": 0, "trt_fp16_enable": bool(fp16)}
            if cache_dir is not None:
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir / "tensorrt"),
                           trt_timing_cache_enable=True)
            options.append(trt)
        elif name == CUDA:
            options.append({"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"})
        else:
            options.append({})
    return options


class OnnxBackend:
    """Four things, as MLPerf's backends: name, version, load, predict."""

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | os.PathLike,
        threads: int | None = None,
        gpus: float = 0.0,
        checked: bool = False,
    ):
        """``checked``: the caller has checked the file against the contract (a
        run's driver did): load neither parses it again nor imports onnx,
        ~1 s of CPU in each actor as it starts (docs/notes/2026-12-02-evening.md)."""
        self.model_path = str(model_path)
        self.checked = checked
        self.threads = threads or os.cpu_count() or 1
        self.gpus = gpus
        self.session = None
        self.providers: list[str] = []
        #: what load() did: "cache-hit", "cache-miss" (built and stored) or "uncached".
        self.load_source = ""

    @property
    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def load(self) -> "OnnxBackend":
        import onnxruntime as ort

        sha256 = sha256_of_file(self.model_path) if self.checked else check_model(self.model_path).sha256
        self.providers = select_providers(self.gpus, ort.get_available_providers(), _env_flag(ENV_TENSORRT, True))
        cache_dir = optimized_cache_dir()
        if self.providers == [CPU] and cache_dir is not None:
            self.session = self._load_cached(sha256, cache_dir)
        else:
            self.load_source = "uncached"
            options = provider_options(self.providers, _env_flag(ENV_FP16, False), cache_dir)
            self.session = ort.InferenceSession(
                self.model_path, session_options(self.threads),
                providers=list(zip(self.providers, options)),
            )
        return self

    def _load_cached(self, sha256: str, cache_dir: Path):
        """Session from the cached optimized graph, building and storing it on a miss.

        A hit skips onnx.load and onnxruntime's graph optimisation (the time it
        saves: docs/performance.md, measured by benchmarks/session_options.py).
        The cached graph is already optimised, so it is loaded with
        optimisation disabled (re-running ORT_ENABLE_ALL on it finds nothing
        to do but costs time). A file that does not load is rebuilt.
        """
        import onnxruntime as ort

        path = optimized_cache_path(cache_dir, sha256, ort.__version__)
        if path.is_file():
            try:
                session = ort.InferenceSession(
                    str(path), session_options(self.threads, level="disable"), providers=[CPU]
                )
                self.load_source = "cache-hit"
                return session
            except Exception:  # truncated or foreign file: rebuild it below
                path.unlink(missing_ok=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home: run uncached
            self.load_source = "uncached"
            return ort.InferenceSession(self.model_path, session_options(self.threads), providers=[CPU])
        with AtomicFile(path, suffix=".tmp.onnx") as file:  # concurrent actors never see half a file
            options = session_options(self.threads, optimized_model_filepath=str(file.temp))
            # onnxruntime warns that an ORT_ENABLE_ALL graph is hardware
            # specific; the cache key carries the CPU fingerprint for that.
            options.log_severity_level = 3
            session = ort.InferenceSession(self.model_path, options, providers=[CPU])
            try:
                file.commit()
                self.load_source = "cache-miss"
            except OSError:
                self.load_source = "uncached"
        return session

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model, by name, for its float input ``x`` [1, 3, 1200, 1200]."""
        if self.session is None:
            self.load()
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {INPUT_NAME: x})))

    def predict(self, x: np.ndarray) -> RawDetections:
        """The model's float input [1, 3, 1200, 1200] → raw detections."""
        if self.session is None:
            self.load()
        bboxes, labels, scores = self.session.run(list(OUTPUTS), {INPUT_NAME: x})
        return RawDetections(bboxes[0], labels[0], scores[0])

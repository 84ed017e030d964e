"""The model contract: what an ONNX file must look like for batchdet to use it.

Facts come from docs/model.md (MLPerf's ``resnet34-ssd1200.onnx``). Any
file meeting this interface works, official or not; :func:`check_model` is
the single gate every entry point (CLI, Detector, Ray actors) goes through, so
a wrong file is refused with one line before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from batchdet.files import sha256_of_file

# --- the official file ------------------------------------------------------
OFFICIAL_NAME = "resnet34-ssd1200.onnx"
OFFICIAL_SIZE = 80_363_696
OFFICIAL_SHA256 = "b417a8186967f1e78670b0075aa72a10e5c7d1a6d5c08af9d13dc97f3d29ef0d"
OFFICIAL_URL = "https://zenodo.org/record/3228411/files/resnet34-ssd1200.onnx"
MIRROR_URL = (
    "https://storage.openvinotoolkit.org/repositories/open_model_zoo/public/2022.1/"
    "ssd-resnet34-1200-onnx/resnet34-ssd1200.onnx"
)

#: The official file's opset is not read from it (it cannot be downloaded
#: here): MLPerf's table says "opset-8", but its graph uses
#: NonMaxSuppression, which first exists in opset 10, as do the ONNX model
#: zoo's conversions of it (opset 10 and 12). So 10 is the lowest it can be,
#: and what stand-ins are built at by default (docs/model.md, "Opset").
OFFICIAL_MIN_OPSET = 10
#: The opsets a stand-in can be built at, each tested; 18 moves ReduceMin's axes to an input.
STANDIN_OPSETS = tuple(range(OFFICIAL_MIN_OPSET, 18))

# --- input ------------------------------------------------------------------
INPUT_NAME = "image"
INPUT_SIZE = 1200  # H = W; the graph's 15,130 default boxes only fit 1200x1200
#: MLPerf normalisation in 0-255 units: (pixel - MEAN) / STD, RGB order.
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
#: batchdet's route from a file's bytes to this input (decode, EXIF, resize,
#: normalise: batchdet/pipeline/preprocess.py). Part of a row's result
#: settings: bump it with any change that can change a pixel of the input,
#: so ``--resume`` refuses to mix rows made before and after.
#: 1: resize on bytes (pixels rounded to grey levels); 2: on floats, as MLPerf.
PREPROCESSING_VERSION = 2

# --- outputs ----------------------------------------------------------------
BBOXES, LABELS, SCORES = "bboxes", "labels", "scores"
OUTPUT_NAMES = (BBOXES, LABELS, SCORES)
#: ``bboxes`` are [x_min, y_min, x_max, y_max], normalised to [0, 1].
NMS_SCORE_THRESHOLD = 0.05  # the model's own in-graph threshold
MAX_DETECTIONS = 200

# --- what a model is (ModelInfo.kind_id) -------------------------------------
#: Metadata the stand-in builder writes: ``batchdet.kind = standin`` (with the
#: seed and channels divisor), and the older ``batchdet.standin = true``,
#: which is all that stand-ins built before the kind key carry; either marks one.
KIND_KEY = "batchdet.kind"
STANDIN_KEY = "batchdet.standin"
#: ``batchdet.weights = smooth`` on a smooth stand-in (batchdet/model/standin.py); absent: random weights
WEIGHTS_KEY = "batchdet.weights"
SMOOTH = "smooth"
#: Metadata ``batchdet model quantize`` writes on its INT8 copy (with the
#: source's own metadata, so a quantized stand-in is still a stand-in).
QUANTIZED_KEY = "batchdet.quantized"
SOURCE_SHA_KEY = "batchdet.quantized.source_sha256"
#: the opset of a source the quantizer converted first (absent when it was not converted)
CONVERTED_FROM_KEY = "batchdet.quantized.converted_from_opset"

#: the four kinds: the official file (by sha256); an INT8 copy of it (by the
#: quantizer's record of its source); a stand-in (random weights, by its
#: metadata, quantized or not); anything else that meets the interface.
OFFICIAL, OFFICIAL_INT8, STANDIN, OTHER = "official", "official-int8", "standin", "other"
#: one line each, as ``model info``, the run summary and the manifest's ``kind`` say it
KIND_TEXT = {
    OFFICIAL: "official MLPerf weights",
    OFFICIAL_INT8: "INT8 copy of the official MLPerf weights (accuracy: check it with `batchdet eval`)",
    STANDIN: "STAND-IN (random weights: detections are meaningless)",
    OTHER: "other conforming model (unofficial file: meets the interface, accuracy unknown)",
}
#: a smooth stand-in's text, FP32 and quantized: the same kind, other weights
SMOOTH_TEXT = "STAND-IN (smooth weights: stable detections, still meaningless)"
SMOOTH_TEXT_INT8 = "STAND-IN, INT8 copy (smooth weights: stable detections, still meaningless)"
#: the same, quantized (an INT8 copy of the official file is its own kind above)
KIND_TEXT_INT8 = {
    STANDIN: "STAND-IN, INT8 copy (random weights: detections are meaningless)",
    OTHER: "other conforming model, INT8 copy (unofficial file: meets the interface, accuracy unknown)",
}
#: how each kind's text begins, including the text older versions wrote into manifests
_KIND_PREFIXES = (("official MLPerf", OFFICIAL), ("INT8 copy of the official", OFFICIAL_INT8),
                  ("STAND-IN", STANDIN), ("other conforming", OTHER), ("unofficial model", OTHER))


def kind_id_from_text(text: str | None) -> str | None:
    """The kind id of a ``kind`` text (a run manifest's, of this or an older
    version); None if the text is missing or unknown."""
    return next((k for prefix, k in _KIND_PREFIXES if text and text.startswith(prefix)), None)


class ModelError(ValueError):
    """The file is not a model batchdet can use; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`check_model` learned about a conforming file."""

    path: str
    size: int
    sha256: str
    parameters: int
    opset: int
    input_shape: tuple
    outputs: dict[str, tuple] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def official(self) -> bool:
        return self.sha256 == OFFICIAL_SHA256

    @property
    def int8(self) -> bool:
        """Written by ``batchdet model quantize``."""
        return QUANTIZED_KEY in self.metadata

    @property
    def source_sha256(self) -> str | None:
        """sha256 of the file an INT8 copy was quantized from, as the quantizer recorded it."""
        return self.metadata.get(SOURCE_SHA_KEY)

    @property
    def converted_from_opset(self) -> int | None:
        """The opset of the file an INT8 copy was converted from before quantizing; None if it was not."""
        value = self.metadata.get(CONVERTED_FROM_KEY, "")
        return int(value) if value.isdigit() else None

    @property
    def opset_text(self) -> str:
        """The opset as ``model info`` says it, with the conversion an INT8 copy went through."""
        source = self.converted_from_opset
        return f"{self.opset} (converted from opset {source} to quantize)" if source is not None else str(self.opset)

    @property
    def kind_id(self) -> str:
        """``official``, ``official-int8``, ``standin`` or ``other`` (see :data:`KIND_TEXT`).

        The official file is known by its sha256; the rest by the metadata
        batchdet wrote (a stand-in's flag, the quantizer's record of its
        source), so a file stripped of it counts as ``other``.
        """
        if self.official:
            return OFFICIAL
        if self.metadata.get(KIND_KEY) == STANDIN or STANDIN_KEY in self.metadata:
            return STANDIN
        if self.int8 and self.source_sha256 == OFFICIAL_SHA256:
            return OFFICIAL_INT8
        return OTHER

    @property
    def smooth(self) -> bool:
        """A smooth stand-in (or its INT8 copy): detections stable enough to compare (docs/model.md)."""
        return self.kind_id == STANDIN and self.metadata.get(WEIGHTS_KEY) == SMOOTH

    @property
    def kind(self) -> str:
        """What the model is, in one line (:data:`KIND_TEXT`)."""
        if self.smooth:
            return SMOOTH_TEXT_INT8 if self.int8 else SMOOTH_TEXT
        kind_id = self.kind_id
        return KIND_TEXT_INT8.get(kind_id, KIND_TEXT[kind_id]) if self.int8 else KIND_TEXT[kind_id]


def _dims(value_info) -> tuple:
    """Shape of a graph input/output: ints where fixed, names (or None) where symbolic."""
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)


def check_model(path: str | os.PathLike) -> ModelInfo:
    """Validate ``path`` against the contract and describe it.

    Raises :class:`ModelError` with one line naming the first thing that
    differs: missing file, not ONNX (or truncated), wrong input name, type or
    rank, a fixed dimension that cannot hold a 1x3x1200x1200 image, or a
    missing output.
    """
    import onnx  # heavy import, only where a model is actually read

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types
        raise ModelError(f"{p} is not a valid ONNX file (corrupt or truncated): {type(e).__name__}") from None
    graph = model.graph
    if not graph.node:
        raise ModelError(f"{p} is not a valid ONNX file: it has no graph")
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ModelError(f"{p}: model input must be one tensor named {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    image = inputs[0]
    if image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        elem = onnx.TensorProto.DataType.Name(image.type.tensor_type.elem_type)
        raise ModelError(f"{p}: input {INPUT_NAME!r} must be float32, found {elem}")
    dims = _dims(image)
    if len(dims) != 4:
        raise ModelError(f"{p}: input {INPUT_NAME!r} must have rank 4 (NCHW), found shape {list(dims)}")
    for axis, want in zip("NCHW", (1, 3, INPUT_SIZE, INPUT_SIZE)):
        got = dims["NCHW".index(axis)]
        if isinstance(got, int) and got not in (0, want):
            raise ModelError(f"{p}: input {INPUT_NAME!r} axis {axis} is {got}, batchdet feeds {want}")
    outputs = {o.name: _dims(o) for o in graph.output}
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        raise ModelError(f"{p}: model lacks output(s) {missing}; it has {sorted(outputs)}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return ModelInfo(
        path=str(p.resolve()),
        size=p.stat().st_size,
        sha256=sha256_of_file(p),
        parameters=int(sum(int(np.prod(t.dims)) for t in graph.initializer)),
        opset=opset,
        input_shape=dims,
        outputs=outputs,
        metadata={m.key: m.value for m in model.metadata_props},
    )

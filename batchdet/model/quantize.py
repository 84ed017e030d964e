"""``batchdet model quantize``: a static INT8 copy of a conforming model.

onnxruntime's static quantization in QDQ format, per-channel weights,
calibrated on real images of a dataset (read and preprocessed exactly as the
pipeline does). Only the backbone, extra blocks and heads are quantized (the
convolutions, and the activations between them); decode, softmax,
NonMaxSuppression and TopK stay float32, so the post-processing is the
official one bit for bit. The result keeps the model contract (float32 input
``image``, the three outputs), so ``batchdet.model.spec.check_model`` accepts it and
``--model`` runs it; a quantized stand-in keeps the stand-in flag.

A model older than opset 13 (the official file's graph is opset 10) is first
converted with onnx's version converter: per-channel Q/DQ nodes need
DequantizeLinear's ``axis``, which opset 13 introduced, and onnxruntime's
quantizer would otherwise write them into an opset-10/11 file where they are
invalid. The converted model must give the original's outputs on calibration
images before it is quantized; otherwise the file is refused.

Accuracy is *not* guaranteed by construction: check it with ``batchdet eval``
on COCO val2017 with the official weights (docs/model.md, "INT8").
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from batchdet.cpu import present
from batchdet.files import AtomicFile
from batchdet.model.spec import (
    CONVERTED_FROM_KEY,
    INPUT_NAME,
    OUTPUT_NAMES,
    QUANTIZED_KEY,
    SOURCE_SHA_KEY,
    ModelError,
    ModelInfo,
    check_model,
)
from batchdet.pipeline.precision import int8_copy_path

if TYPE_CHECKING:
    from batchdet.pipeline.speedup import Speedup

#: metadata keys written on the quantized model, besides the source's own:
#: QUANTIZED_KEY (what was quantized, how), SOURCE_SHA_KEY (the source file's
#: sha256: an INT8 copy of the official file is told by it, see
#: ``spec.ModelInfo.kind_id``), CONVERTED_FROM_KEY (the source's opset, when
#: it was converted first), the source's kind and the calibration used.
SOURCE_KIND_KEY = "batchdet.quantized.source_kind"
CALIBRATION_KEY = "batchdet.quantized.calibration"
#: Per-channel Q/DQ (DequantizeLinear's ``axis``) first exists in opset 13:
#: an older source is converted to it, the smallest step that makes the
#: quantized file valid.
QUANTIZE_OPSET = 13
#: How far a converted model's boxes and scores may stray from the
#: original's: float rounding of rearranged arithmetic, far below what a
#: changed operator meaning gives (labels and counts must match exactly).
CONVERSION_ATOL = 1e-5

#: Operators quantized. Conv carries ~all the FLOPs; Relu is then absorbed
#: into the convolution's output quantization (no float pass between two
#: convolutions) and MaxPool runs on uint8. See docs/model.md, "INT8",
#: for the measured effect of each. Nothing after the heads is in the list:
#: Reshape, Concat, Softmax, the decode arithmetic, NonMaxSuppression and
#: TopK stay float32.
DEFAULT_OP_TYPES = ("Conv", "Relu", "MaxPool")
DEFAULT_IMAGES = 32


def default_output(model: str | os.PathLike) -> Path:
    """``<dir>/<name>.int8.onnx`` beside the model, where ``--precision int8`` looks for it."""
    return int8_copy_path(model)


def _pick(uris: list[str], n: int) -> list[str]:
    """``n`` URIs spread evenly over the sorted listing (not just its first folder)."""
    if n >= len(uris):
        return list(uris)
    idx = np.linspace(0, len(uris) - 1, n).round().astype(int)
    return [uris[i] for i in idx]


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over dataset images: reads them a
    batch at a time (``batchdet.pipeline.reading.read_many``), preprocesses each with
    ``batchdet.pipeline.preprocess.preprocess`` (MLPerf's float input) and yields
    ``{"image": x}``. Unreadable or undecodable images are skipped and counted."""

    def __init__(self, uris: list[str], storage_options: dict[str, Any] | None = None, batch: int = 8,
                 progress: Callable[[int, int], None] | None = None):
        self.uris = uris
        self.storage_options = storage_options
        self.batch = batch
        self.progress = progress
        self.used = 0
        self.skipped: list[str] = []
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        from batchdet.pipeline.preprocess import ImageError, preprocess
        from batchdet.pipeline.reading import read_many

        for start in range(0, len(self.uris), self.batch):
            chunk = self.uris[start:start + self.batch]
            for uri, data in zip(chunk, read_many(chunk, self.storage_options)):
                if isinstance(data, ImageError):
                    self.skipped.append(f"{uri}: {data}")
                    continue
                try:
                    x, _, _ = preprocess(data)
                except ImageError as e:
                    self.skipped.append(f"{uri}: {e}")
                    continue
                self.used += 1
                if self.progress:
                    self.progress(self.used, len(self.uris))
                yield {INPUT_NAME: x}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._generate()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None
        self.used = 0
        self.skipped = []


def quantize_model(
    model: str | os.PathLike,
    calibrate: str | os.PathLike,
    images: int = DEFAULT_IMAGES,
    to: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES,
    reduce_range: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a static INT8 (QDQ, per-channel) copy of ``model`` calibrated on
    up to ``images`` images of the dataset URL ``calibrate``; return its path.

    ``reduce_range`` (7-bit weights) defaults to on for CPUs without VNNI,
    where onnxruntime's u8×s8 kernels can saturate 16-bit intermediate sums.
    Raises ValueError (via the listing or the model check) on bad arguments.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from batchdet.pipeline.listing import list_images

    if images < 1:
        raise ValueError(f"--images must be at least 1, got {images}")
    info = check_model(model)
    out = Path(to) if to else default_output(model)
    if out.resolve() == Path(info.path):
        raise ValueError(f"refusing to overwrite the source model {out}")
    calibrate = str(calibrate)
    listing = list_images(calibrate, storage_options)
    uris = _pick(listing.uris, images)
    if reduce_range is None:
        reduce_range = not _has_vnni()
    reader = ImageCalibrationReader(uris, storage_options, progress=progress)
    started = time.perf_counter()
    converted = info.opset < QUANTIZE_OPSET
    with tempfile.TemporaryDirectory(prefix="batchdet-quantize-") as tmp:
        source = Path(info.path)
        if converted:
            source = Path(tmp) / "converted.onnx"
            samples = calibration_samples(calibrate, images, storage_options=storage_options)
            convert_opset(info, source, samples)
        pre = Path(tmp) / "pre.onnx"
        # folds BatchNormalization into the convolutions and infers shapes, so
        # that every Conv quantizes with its BN scale in its weights
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre), str(quantized), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # MinMax keeps only each tensor's min and max per image (the calibrator
            # adds ReduceMin/ReduceMax outputs), so memory does not grow with images
            calibrate_method=CalibrationMethod.MinMax,
        )
        if reader.used == 0:
            raise ValueError(f"no usable calibration image under {calibrate}: {reader.skipped[:3]}")
        result = onnx.load(str(quantized))
    metadata = dict(info.metadata)
    if converted:
        metadata[CONVERTED_FROM_KEY] = str(info.opset)
    metadata.update({
        QUANTIZED_KEY: f"int8 static QDQ per-channel ({'+'.join(op_types)}), activations uint8, weights int8"
                       + (" 7-bit" if reduce_range else "")
                       + (f"; converted from opset {info.opset} to {QUANTIZE_OPSET} first" if converted else ""),
        SOURCE_SHA_KEY: info.sha256,
        SOURCE_KIND_KEY: info.kind_id,
        CALIBRATION_KEY: f"{reader.used} images from {calibrate} (MinMax); "
                         f"{len(reader.skipped)} skipped; {time.perf_counter() - started:.0f} s",
    })
    del result.metadata_props[:]
    for key, value in sorted(metadata.items()):
        result.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    if not result.producer_name:
        result.producer_name = "batchdet.quantize"
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(out) as file:
        onnx.save(result, str(file.temp))
        file.commit()
    check_model(out)  # the contract still holds
    return out


def convert_opset(info: ModelInfo, to: Path, samples: list[np.ndarray], opset: int = QUANTIZE_OPSET) -> None:
    """Write the model ``info`` describes, converted to ``opset`` by onnx's
    version converter, to ``to`` -- once its outputs on ``samples`` (model
    inputs, see :func:`calibration_samples`) match the original's.

    The converter's adapters are per operator and not all are right (onnx
    1.23 turns an opset-12 Hardmax, which flattens its input, into an
    opset-13 one over a single axis), so the result is run, not trusted.
    Raises :class:`ModelError` in one line when the conversion fails or an
    output differs.
    """
    import onnx
    from onnx import helper, version_converter

    refuse = f"cannot quantize {info.path}: converting it from opset {info.opset} to {opset}"
    if not samples:
        raise ModelError(f"{refuse} needs a readable calibration image to check the converted model on")
    try:
        converted = version_converter.convert_version(onnx.load(info.path), opset)
        # the converter keeps the source's IR version, too old for the new opset
        converted.ir_version = max(converted.ir_version,
                                   helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
        onnx.checker.check_model(converted, full_check=True)
    except Exception as e:  # the converter and checker raise assorted types; the message says what
        raise ModelError(f"{refuse} failed: {_first_line(e)}") from None
    onnx.save(converted, str(to))
    difference = output_difference(info.path, str(to), samples)
    if difference:
        raise ModelError(f"{refuse} changed its outputs ({difference}); quantize a copy exported at opset {opset}")


def output_difference(original: str, converted: str, samples: list[np.ndarray]) -> str | None:
    """How the two models' outputs first differ on ``samples``, in a few words; None when they agree
    (same count and labels, boxes and scores within :data:`CONVERSION_ATOL`)."""
    import onnxruntime as ort

    try:
        sessions = [ort.InferenceSession(path, providers=["CPUExecutionProvider"]) for path in (original, converted)]
    except Exception as e:  # onnxruntime's errors carry the node that does not load
        return f"it does not load in onnxruntime: {_first_line(e)}"
    for i, x in enumerate(samples, start=1):
        want, got = [dict(zip(OUTPUT_NAMES, s.run(list(OUTPUT_NAMES), {INPUT_NAME: x}))) for s in sessions]
        for name in OUTPUT_NAMES:
            a, b = want[name], got[name]
            if a.shape != b.shape:
                return f"image {i}: {name} shape {list(a.shape)} became {list(b.shape)}"
            exact = a.dtype.kind in "iu"
            if not (np.array_equal(a, b) if exact else np.allclose(a, b, rtol=0.0, atol=CONVERSION_ATOL)):
                return f"image {i}: {name} differ by up to {np.max(np.abs(a.astype(np.float64) - b)):g}"
    return None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


#: x86 extensions with an 8-bit dot product (``/proc/cpuinfo`` flag names):
#: AVX512-VNNI (Intel Cascade Lake / Ice Lake and later, AMD Zen 4 and later),
#: AVX-VNNI (Intel Alder Lake and later), AMX (Intel Sapphire Rapids and later).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_cpu_flags(cpuinfo: str | None = None) -> list[str] | None:
    """The :data:`INT8_DOT_FLAGS` this CPU has, from ``cpuinfo`` (the text of
    ``/proc/cpuinfo``, read when None): ``[]`` for an x86 CPU without any, so
    INT8 convolutions run at about FP32's speed; None when it cannot tell (no
    x86 ``flags`` line: another architecture, or no ``/proc/cpuinfo``)."""
    return present(INT8_DOT_FLAGS, cpuinfo)


def int8_cpu_hint(flags: list[str] | None) -> str | None:
    """One line for a CPU without an 8-bit dot product (``flags == []``); None otherwise."""
    if flags != []:
        return None
    return ("hint: this CPU has no AVX512_VNNI, AVX_VNNI or AMX: its INT8 convolutions are about as fast as FP32's, "
            "so expect little speed-up here; INT8 pays on CPUs with them (Intel Ice Lake+, AMD Zen 4+) and on GPUs")


def _has_vnni() -> bool:
    """False only for an x86 CPU known to lack VNNI/AMX (unknown: keep the full 8-bit range)."""
    return int8_cpu_flags() != []


# --- FP32 against INT8 on this machine ----------------------------------------------
MEASURE_IMAGES = 3
MEASURE_ROUNDS = 2


def calibration_samples(calibrate: str | os.PathLike, images: int = DEFAULT_IMAGES, n: int = MEASURE_IMAGES,
                        storage_options: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Up to ``n`` of the images :func:`quantize_model` calibrates on with
    ``images``, spread over them, as the pipeline feeds them to the model
    (float32 [1, 3, 1200, 1200]); unreadable ones are left out."""
    from batchdet.pipeline.listing import list_images
    from batchdet.pipeline.speedup import model_inputs

    return model_inputs(_pick(_pick(list_images(str(calibrate), storage_options).uris, images), n), storage_options)


def compare_speed(fp32: str | os.PathLike, int8: str | os.PathLike, images: list[np.ndarray],
                  rounds: int = MEASURE_ROUNDS, threads: int | None = None) -> Speedup:
    """Time ``fp32`` and ``int8`` on ``images`` (model inputs, see
    :func:`calibration_samples`) the way the pipeline runs them
    (``batchdet.pipeline.inference.OnnxBackend``, its session options, ``threads``
    defaulting to every CPU): one untimed run each, then image by image,
    FP32 and INT8 alternately, ``rounds`` times; medians, as the speed-up
    ``detect`` measures for an engine (:class:`batchdet.pipeline.speedup.Speedup`)."""
    import onnxruntime

    from batchdet.pipeline.inference import OnnxBackend
    from batchdet.pipeline.speedup import Speedup, time_interleaved

    backends = [OnnxBackend(fp32, threads).load(), OnnxBackend(int8, threads).load()]
    fp32_s, int8_s = map(np.median, time_interleaved(backends, images, rounds))
    runtime = f"onnxruntime {onnxruntime.__version__}"
    return Speedup(f"{runtime} int8", f"{runtime} fp32", float(int8_s), float(fp32_s), len(images), rounds,
                   backends[0].threads, datetime.now(timezone.utc).isoformat(timespec="seconds"))

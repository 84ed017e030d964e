"""``batchdet model quantize``: a static INT8 copy of a conforming model.

onnxruntime's static quantization in QDQ format, per-channel weights,
calibrated on real images of a dataset (read and preprocessed exactly as the
pipeline does). Only the backbone, extra blocks and heads are quantized (the
convolutions, and the activations between them); decode, softmax,
NonMaxSuppression and TopK stay float32, so the post-processing is the
official one bit for bit. The result keeps the model contract (float32 input
``image``, the three outputs), so ``batchdet.spec.check_model`` accepts it and
``--model`` runs it; a quantized stand-in keeps the stand-in flag.

Accuracy is *not* guaranteed by construction: check it with ``batchdet eval``
on COCO val2017 with the official weights (README, "INT8").
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from batchdet.spec import INPUT_NAME, check_model

#: metadata keys written on the quantized model
QUANTIZED_KEY = "batchdet.quantized"
SOURCE_SHA_KEY = "batchdet.quantized.source_sha256"
CALIBRATION_KEY = "batchdet.quantized.calibration"

#: Operators quantized. Conv carries ~all the FLOPs; Relu is then absorbed
#: into the convolution's output quantization (no float pass between two
#: convolutions) and MaxPool runs on uint8. See the README, "INT8",
#: for the measured effect of each. Nothing after the heads is in the list:
#: Reshape, Concat, Softmax, the decode arithmetic, NonMaxSuppression and
#: TopK stay float32.
DEFAULT_OP_TYPES = ("Conv", "Relu", "MaxPool")
DEFAULT_IMAGES = 32


def default_output(model: str | os.PathLike) -> Path:
    """``<dir>/<name>.int8.onnx`` beside the model."""
    p = Path(model)
    return p.with_name(p.stem + ".int8.onnx")


def _pick(uris: list[str], n: int) -> list[str]:
    """``n`` URIs spread evenly over the sorted listing (not just its first folder)."""
    if n >= len(uris):
        return list(uris)
    idx = np.linspace(0, len(uris) - 1, n).round().astype(int)
    return [uris[i] for i in idx]


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over dataset images: reads them a
    batch at a time (``batchdet.reading.read_many``), preprocesses each with
    ``batchdet.preprocess.preprocess`` (MLPerf's float input) and yields
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
        from batchdet.preprocess import ImageError, preprocess
        from batchdet.reading import read_many

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

    from batchdet.listing import list_images

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
    with tempfile.TemporaryDirectory(prefix="batchdet-quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # folds BatchNormalization into the convolutions and infers shapes, so
        # that every Conv quantizes with its BN scale in its weights
        quant_pre_process(str(info.path), str(pre), skip_symbolic_shape=True)
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
    metadata.update({
        QUANTIZED_KEY: f"int8 static QDQ per-channel ({'+'.join(op_types)}), activations uint8, weights int8"
                       + (" 7-bit" if reduce_range else ""),
        SOURCE_SHA_KEY: info.sha256,
        CALIBRATION_KEY: f"{reader.used} images from {calibrate} (MinMax); "
                         f"{len(reader.skipped)} skipped; {time.perf_counter() - started:.0f} s",
    })
    del result.metadata_props[:]
    for key, value in sorted(metadata.items()):
        result.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    if not result.producer_name:
        result.producer_name = "batchdet.quantize"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    onnx.save(result, str(tmp_out))
    tmp_out.replace(out)
    check_model(out)  # the contract still holds
    return out


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown CPU: keep full 8-bit range
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags

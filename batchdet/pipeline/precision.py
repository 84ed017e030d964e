"""Which engine runs the model, at which precision: chosen and refused before any work.

``--precision fp32|bf16|int8`` says what arithmetic the convolutions use,
``--engine auto|onnxruntime|openvino`` what runs them. :func:`choose` turns
the two, the CPU's flags and what is installed into a :class:`Choice`, or a
one-line ValueError: a run is never silently slower than FP32 (bf16 without
the CPU's bf16 instructions is emulated) nor silently another precision than
asked. :func:`batchdet.pipeline.backend.make_backend` then builds the chosen
backend in each actor, which checks the CPU again (a cluster's nodes need not
be the driver's).
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from batchdet.cpu import present
from batchdet.model.spec import ModelInfo, check_model
from batchdet.options import AUTO, BF16, FP32, INT8, ONNXRUNTIME, OPENVINO

#: x86 flags of native bf16 arithmetic (``/proc/cpuinfo`` names): AVX512_BF16
#: (Intel Cooper Lake, AMD Zen 4 and later), AMX-BF16 (Intel Sapphire Rapids and later).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
OPENVINO_INSTALL = "pip install 'batchdet[openvino]'"


@dataclass(frozen=True)
class Choice:
    """What runs the model: the engine and the precision of its arithmetic."""

    engine: str  # ONNXRUNTIME or OPENVINO
    precision: str  # FP32, BF16 or INT8


#: batchdet's engine and precision when nothing else is asked for.
DEFAULT_CHOICE = Choice(ONNXRUNTIME, FP32)

def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (not imported: ~0.5 s)."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_bf16_cpu(flags: list[str] | None) -> None:
    """Refuse bf16 on a CPU without native bf16 (``flags``: the :data:`BF16_FLAGS` it has, None: unknown)."""
    if flags is None:
        raise ValueError("--precision bf16: cannot tell whether this CPU has AVX512_BF16 or AMX-BF16 (no x86 flags "
                         "in /proc/cpuinfo); use --precision fp32")
    if not flags:
        raise ValueError("--precision bf16 needs a CPU with AVX512_BF16 or AMX-BF16 (Intel Cooper Lake, Sapphire "
                         "Rapids and later; AMD Zen 4 and later); this CPU has neither, so bf16 would be emulated "
                         "and slower than fp32: use --precision fp32 (or int8)")


def choose_engine(precision: str, engine: str, gpus: float, bf16_flags: list[str] | None,
                  openvino: str | None) -> Choice:
    """The engine for ``precision`` (``engine`` AUTO: OpenVINO for bf16, the only
    one with bf16 CPU kernels; onnxruntime otherwise, batchdet's measured default),
    or ValueError in one line. ``bf16_flags``: :func:`batchdet.cpu.present` of
    :data:`BF16_FLAGS`; ``openvino``: :func:`openvino_version`."""
    chosen = (OPENVINO if precision == BF16 else ONNXRUNTIME) if engine == AUTO else engine
    if precision == BF16:
        check_bf16_cpu(bf16_flags)
        if chosen != OPENVINO:
            raise ValueError("--precision bf16 runs on OpenVINO (onnxruntime has no bf16 CPU kernels): "
                             "use --engine openvino or auto")
    if chosen == OPENVINO:
        if gpus > 0:
            raise ValueError(f"--engine openvino runs on the CPU; --gpus-per-actor {gpus:g} needs --engine "
                             "onnxruntime" + (" and --precision fp32 or int8" if precision == BF16 else ""))
        if openvino is None:
            what = "--precision bf16" if precision == BF16 else "--engine openvino"
            raise ValueError(f"{what} needs OpenVINO, which is not installed: {OPENVINO_INSTALL}")
    return Choice(chosen, precision)


def int8_copy_path(model: str | os.PathLike) -> Path:
    """``<dir>/<name>.int8.onnx`` beside the model: where ``batchdet model quantize`` writes its INT8 copy."""
    p = Path(model)
    return p.with_name(p.stem + ".int8.onnx")


def model_for(precision: str, model: ModelInfo) -> ModelInfo:
    """The file a run at ``precision`` runs, or ValueError in one line.

    int8: ``model`` itself if it is an INT8 copy, else its copy beside it made
    from this very file (the quantizer records the source's sha256); fp32 and
    bf16: ``model``, which must not be an INT8 copy for bf16 (bf16 of INT8
    weights is no precision OpenVINO runs)."""
    if model.int8:
        if precision == BF16:
            raise ValueError(f"--precision bf16 needs a float model; {model.path} is an INT8 copy "
                             f"(pass its source, sha256 {model.source_sha256 or 'not recorded'})")
        return model
    if precision != INT8:
        return model
    make = f"make one with `batchdet model quantize {model.path} --calibrate DATASET`"
    if "://" in model.path:
        raise ValueError(f"--precision int8 with a URL model: give its INT8 copy as --model, or {make}")
    copy = int8_copy_path(model.path)
    if not copy.is_file():
        raise ValueError(f"--precision int8: no INT8 copy of {model.path} at {copy}: {make}")
    info = check_model(copy)
    if not info.int8 or info.source_sha256 != model.sha256:
        raise ValueError(f"--precision int8: {copy} was not quantized from {model.path} "
                         f"(its source sha256: {info.source_sha256 or 'not recorded'}): {make}")
    return info


def choose(precision: str, engine: str, gpus: float, model: ModelInfo) -> tuple[Choice, ModelInfo]:
    """What a run with these options runs on this machine, and the model file it
    runs (:func:`model_for`); an INT8 file given as the model runs at int8 whatever
    ``precision`` was left at (the file decides, and the manifest says so)."""
    model = model_for(precision, model)
    effective = INT8 if model.int8 else precision
    flags = present(BF16_FLAGS) if effective == BF16 else []
    return choose_engine(effective, engine, gpus, flags, openvino_version()), model

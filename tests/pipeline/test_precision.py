"""--precision and --engine: what runs, read from the CPU's flags and what is
installed (pure functions on sample /proc/cpuinfo texts), and which file an
int8 run uses; each refusal one line, naming what is missing."""

from __future__ import annotations

import shutil

import onnx
import pytest

from batchdet.cpu import cpu_flags, present
from batchdet.model.spec import QUANTIZED_KEY, SOURCE_SHA_KEY, check_model
from batchdet.options import AUTO, BF16, FP32, INT8, ONNXRUNTIME, OPENVINO
from batchdet.pipeline import precision
from batchdet.pipeline.precision import BF16_FLAGS, Choice, choose, choose_engine, int8_copy_path, model_for

AMD_ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx avx2\n"
AMD_ZEN4 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 avx512_vbmi2\n"
INTEL_COOPER = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"
INTEL_SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8 avx_vnni\n"
INTEL_ICELAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, flags", [
    (AMD_ZEN3, []),
    (INTEL_ICELAKE, []),
    (AMD_ZEN4, ["avx512_bf16"]),
    (INTEL_COOPER, ["avx512_bf16"]),
    (INTEL_SAPPHIRE, ["amx_bf16"]),
    ("processor\t: 0\nflags\t\t: avx2 xavx512_bf16 amx_bf16x\n", []),  # whole names only
    (ARM, None),  # no x86 flags line: cannot tell
    ("", None),
])
def test_bf16_flags_from_cpuinfo(cpuinfo, flags):
    assert present(BF16_FLAGS, cpuinfo) == flags


def test_the_first_processor_speaks_for_all():
    assert cpu_flags(AMD_ZEN3) == {"fpu", "sse", "avx", "avx2", "fma"}
    assert cpu_flags(ARM) is None


def _refusal(*args) -> str:
    with pytest.raises(ValueError) as e:
        choose_engine(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("precision, engine, gpus, flags, openvino, expected", [
    (FP32, AUTO, 0, [], None, Choice(ONNXRUNTIME, FP32)),  # batchdet's default needs nothing
    (FP32, AUTO, 1, None, None, Choice(ONNXRUNTIME, FP32)),
    (INT8, AUTO, 0, [], None, Choice(ONNXRUNTIME, INT8)),
    (FP32, OPENVINO, 0, [], "2026.4.1", Choice(OPENVINO, FP32)),
    (INT8, OPENVINO, 0, [], "2026.4.1", Choice(OPENVINO, INT8)),
    (BF16, AUTO, 0, ["amx_bf16"], "2026.4.1", Choice(OPENVINO, BF16)),
    (BF16, OPENVINO, 0, ["avx512_bf16"], "2024.0", Choice(OPENVINO, BF16)),
])
def test_engine_for_each_precision(precision, engine, gpus, flags, openvino, expected):
    assert choose_engine(precision, engine, gpus, flags, openvino) == expected


def test_bf16_refusals_name_what_is_missing():
    no_bf16 = _refusal(BF16, AUTO, 0, [], "2026.4.1")
    assert no_bf16.startswith("--precision bf16 needs a CPU with AVX512_BF16 or AMX-BF16") and "slower" in no_bf16
    assert "cannot tell" in _refusal(BF16, AUTO, 0, None, "2026.4.1")
    # the CPU first: without bf16 instructions, installing OpenVINO would not help
    assert "AVX512_BF16" in _refusal(BF16, AUTO, 0, [], None)
    assert _refusal(BF16, AUTO, 0, ["amx_bf16"], None) == (
        "--precision bf16 needs OpenVINO, which is not installed: pip install 'batchdet[openvino]'")
    assert "--engine openvino or auto" in _refusal(BF16, ONNXRUNTIME, 0, ["amx_bf16"], "2026.4.1")
    assert "--gpus-per-actor 1 needs --engine onnxruntime and --precision fp32 or int8" in \
        _refusal(BF16, AUTO, 1, ["amx_bf16"], "2026.4.1")


def test_openvino_refusals():
    assert _refusal(FP32, OPENVINO, 0, [], None) == (
        "--engine openvino needs OpenVINO, which is not installed: pip install 'batchdet[openvino]'")
    assert _refusal(FP32, OPENVINO, 0.5, [], "2026.4.1").startswith("--engine openvino runs on the CPU")


def _int8_copy(source, to, source_sha256):
    """``source`` marked as ``batchdet model quantize`` marks its copies: what
    :func:`model_for` reads is that record, not the weights."""
    model = onnx.load(str(source))
    model.metadata_props.append(onnx.StringStringEntryProto(key=QUANTIZED_KEY, value="int8 (test)"))
    model.metadata_props.append(onnx.StringStringEntryProto(key=SOURCE_SHA_KEY, value=source_sha256))
    onnx.save(model, str(to))
    return check_model(to)


def test_int8_uses_the_copy_made_from_this_very_model(narrow_model, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(narrow_model, model)
    info = check_model(model)
    assert model_for(FP32, info) == info == model_for(BF16, info)
    with pytest.raises(ValueError, match=r"no INT8 copy of .*m\.onnx at .*m\.int8\.onnx: make one with "
                                         r"`batchdet model quantize .*m\.onnx --calibrate DATASET`"):
        model_for(INT8, info)

    stale = _int8_copy(narrow_model, int8_copy_path(model), "0" * 64)  # made from another file
    with pytest.raises(ValueError, match="was not quantized from .*its source sha256: 0000"):
        model_for(INT8, info)

    copy = _int8_copy(narrow_model, int8_copy_path(model), info.sha256)
    assert copy.sha256 != stale.sha256 and model_for(INT8, info) == copy
    assert model_for(INT8, copy) == copy == model_for(FP32, copy)  # an INT8 file given directly is int8
    with pytest.raises(ValueError, match="--precision bf16 needs a float model"):
        model_for(BF16, copy)


def test_an_int8_file_runs_at_int8_whatever_the_precision_left_at(narrow_model, tmp_path):
    copy = _int8_copy(narrow_model, tmp_path / "m.int8.onnx", "1" * 64)
    assert choose(FP32, AUTO, 0, copy) == (Choice(ONNXRUNTIME, INT8), copy)
    plain = check_model(narrow_model)
    assert choose(FP32, AUTO, 0, plain) == (Choice(ONNXRUNTIME, FP32), plain)


def test_choose_reads_this_cpu(narrow_model, monkeypatch):
    """bf16 is decided by the flags of the CPU it runs on (here: sample ones)."""
    info = check_model(narrow_model)
    for cpuinfo, allowed in ((AMD_ZEN3, False), (INTEL_SAPPHIRE, True)):
        monkeypatch.setattr(precision, "present", lambda wanted, text=None, c=cpuinfo: present(wanted, c))
        if allowed:
            assert choose(BF16, AUTO, 0, info) == (Choice(OPENVINO, BF16), info)
        else:
            with pytest.raises(ValueError, match="needs a CPU with AVX512_BF16"):
                choose(BF16, AUTO, 0, info)

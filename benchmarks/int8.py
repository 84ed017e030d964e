#!/usr/bin/env python
"""INT8 against FP32: what ``batchdet model quantize`` gains on this CPU.

The model (default: the full stand-in) is quantized as ``batchdet model
quantize`` does, calibrated on the same synthesized 640×480 JPEGs; FP32 and
INT8 then run bare (batchdet's session options, ready inputs, Ray's worker
niceness) image by image, alternately, so both see the same load. Beside it
the kernel ceiling: one 3×3 convolution of the model's commonest shape, FP32
against the same layer quantized the same way. The target is a ratio within
this run.

    python benchmarks/int8.py --out bench-out/int8.json
    python benchmarks/int8.py --quick --out bench-out/int8-quick.json   # CI smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import harness


TARGETS = {"int8_speedup": (">=", 1.7)}


def int8_kernel_ceiling(threads: int, reps: int = 5, channels: int = 256, size: int = 75) -> dict:
    """What onnxruntime's INT8 convolution gains on this CPU, free of the
    model: one 3×3 convolution of the model's commonest shape (256→256
    channels, the backbone's 75×75 stage), FP32 against the same layer
    quantized exactly as ``batchdet model quantize`` does (static QDQ,
    per-channel, u8 activations, s8 weights), timed interleaved. The model's
    time is ~99 % convolutions, so its gain follows theirs: ~1× without VNNI,
    ~4× with it (docs/model.md, INT8)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from batchdet.model.quantize import _has_vnni
    from batchdet.pipeline.inference import session_options

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = [np.maximum(rng.standard_normal(shape), 0).astype(np.float32) for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": x} for x in inputs)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        f32, q8 = Path(tmp) / "conv.onnx", Path(tmp) / "conv.int8.onnx"
        f32.write_bytes(model.SerializeToString())
        quantize_static(str(f32), str(q8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=not _has_vnni(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        sessions = {name: ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
                    for name, path in (("fp32", f32), ("int8", q8))}
    runs = {name: (lambda x, s=s: s.run(None, {"x": x})) for name, s in sessions.items()}
    harness.min_per_item(runs, inputs[:1], 1)  # warm-up
    t = harness.min_per_item(runs, inputs, reps)
    res = {"layer": f"Conv 3x3 {channels}->{channels} at {size}x{size} + Relu",
           "fp32_ms": t["fp32"] * 1e3, "int8_ms": t["int8"] * 1e3, "speedup": t["fp32"] / t["int8"],
           "vnni": _has_vnni()}
    print(f"  int8 kernel ceiling: {res['layer']}: {res['fp32_ms']:.1f} -> {res['int8_ms']:.1f} ms, "
          f"{res['speedup']:.2f}x", flush=True)
    return res


def measure_int8(model: Path, fp32, images_folder: Path, inputs: list[np.ndarray], threads: int,
                 calibration: int, workdir: Path, given: str | None) -> dict:
    from batchdet.model.quantize import quantize_model
    from batchdet.model.spec import check_model

    t = time.perf_counter()
    if given:
        path, source = Path(given), "given"
    else:
        path = workdir / (model.stem + ".int8.onnx")
        path = quantize_model(model, images_folder, images=calibration, to=path, progress=None)
        source = "quantized"
    quantize_s = time.perf_counter() - t
    info = check_model(path)
    int8 = harness.float_session(path, threads)
    harness.timed_runs(int8, inputs[:1])  # warm-up
    f_times, q_times = [], []
    with harness.Phase(harness.own_cpu) as ph:
        for x in inputs:  # interleaved image by image: both see the same load
            f_times += harness.timed_runs(fp32, [x])
            q_times += harness.timed_runs(int8, [x])
    res = {"model": str(path), "source": source, "quantize_s": quantize_s, "calibration_images": calibration,
           "standin": "batchdet.standin" in info.metadata, "size_bytes": info.size,
           "foreign_cpu_cores": ph.foreign_cores, **speedup(f_times, q_times)}
    print(f"  int8: {res['int8_s_per_image']:.3f} s/image vs fp32 {res['fp32_s_per_image']:.3f}: "
          f"{res['speedup']:.2f}x (others used {ph.foreign_cores:.2f} cores)", flush=True)
    return res


def speedup(fp32_times: list[float], int8_times: list[float]) -> dict:
    """FP32's and INT8's mean seconds per image, timed image by image
    alternately, and INT8's speed-up: FP32's time over INT8's."""
    fp32, int8 = statistics.fmean(fp32_times), statistics.fmean(int8_times)
    return {"images": len(fp32_times), "fp32_s_per_image": fp32, "int8_s_per_image": int8, "speedup": fp32 / int8}


def rows(res: dict) -> list[tuple[str, str, str]]:
    q = res["int8"]
    k = q["kernel_ceiling"]
    return [("bare onnxruntime INT8", f"{1 / q['int8_s_per_image']:.4f} img/s",
             f"{q['speedup']:.2f} x FP32 ({q['fp32_s_per_image']:.3f} -> {q['int8_s_per_image']:.3f} s/image)"),
            ("  INT8 kernel ceiling", f"{k['speedup']:.2f} x",
             f"{k['layer']}: {k['fp32_ms']:.1f} -> {k['int8_ms']:.1f} ms FP32 -> INT8 "
             f"({'VNNI' if k['vnni'] else 'no VNNI: 7-bit weights'})")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p, "bench-out/int8.json")
    p.add_argument("--int8", default="auto", help="'auto' quantizes the model; a path uses that INT8 file")
    p.add_argument("--calibration-images", type=int, default=4,
                   help="INT8 calibration images (speed does not depend on them; accuracy would)")
    p.add_argument("--images", type=int, default=4, help="images for the interleaved FP32/INT8 comparison")
    p.add_argument("--reps", type=int, default=5, help="tries of the kernel ceiling; the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: CPUs, at most 4)")
    p.add_argument("--bare-nice", type=int, default=harness.RAY_WORKER_NICENESS,
                   help="niceness of the bare loops (default: Ray's worker niceness, 15)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: narrow stand-in (divisor 16), 2 calibration images, 1 image, 2 tries")
    args = p.parse_args(argv)
    if args.quick:
        harness.quick_model(args)
        args.calibration_images, args.images, args.reps = 2, 1, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir, started, res = harness.begin(args)
    threads = harness.threads(args)
    model = harness.resolve_model(args, workdir)
    res["config"] = {**harness.model_config(args, model), "images": args.images,
                     "calibration_images": args.calibration_images, "threads": threads, "quick": args.quick,
                     "command": harness.command(argv)}
    files = harness.synthesize(workdir / "images", max(args.images, args.calibration_images))
    calibration = harness.dataset_folder(workdir, files, args.calibration_images)
    bare = harness.niced_executor(args.bare_nice)
    fp32 = bare.submit(harness.float_session, model, threads).result()
    inputs = harness.ready_inputs(files[:max(1, args.images)])
    print("int8 ...", flush=True)
    res["int8"] = bare.submit(measure_int8, model, fp32, calibration, inputs, threads, args.calibration_images,
                              workdir, None if args.int8 == "auto" else args.int8).result()
    res["int8"]["kernel_ceiling"] = bare.submit(int8_kernel_ceiling, threads, args.reps).result()
    bare.shutdown()
    res["targets"] = harness.judge(TARGETS, {"int8_speedup": res["int8"]["speedup"]},
                                   {"int8_speedup": res["int8"]["foreign_cpu_cores"]})
    res["elapsed_s"] = time.time() - started
    harness.write_report(Path(args.out), res, rows(res))
    return res


if __name__ == "__main__":
    main()

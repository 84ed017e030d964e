#!/usr/bin/env python
"""Preprocessing against a bare decode: what batchdet spends turning a file into the model's input.

Per image of the same synthesized 640×480 JPEGs: ``prepare`` (decode,
orient, resize to 1200×1200) plus the actor's ``normalize`` into its reused
buffer, against a bare Pillow decode of the same bytes; the in-graph
normalisation the GPU path uses and MLPerf's own numpy maths beside it. Per
image the fastest of ``--reps`` tries, interleaved; the target is a ratio
within this run.

    python benchmarks/preprocessing.py --out bench-out/preprocessing.json
    python benchmarks/preprocessing.py --quick --out bench-out/preprocessing-quick.json   # CI smoke
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np

import harness


TARGETS = {"preprocess_vs_decode": ("<=", 3.0)}


def front_end_session(threads: int):
    """Only the nodes the GPU path prepends (``add_uint8_input``), as a session
    with batchdet's options: what normalising in the graph would cost here."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from batchdet.model.spec import INPUT_NAME
    from batchdet.pipeline.inference import add_uint8_input, session_options

    shape = [1, 3, 1200, 1200]
    graph = helper.make_graph(
        [helper.make_node("Identity", [INPUT_NAME], ["normalised"])], "front_end",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("normalised", TensorProto.FLOAT, shape)],
    )
    model = add_uint8_input(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def mlperf_numpy_normalise(planes: np.ndarray) -> np.ndarray:
    """MLPerf's own numpy maths, as a yardstick: float image, - mean, / std, CHW."""
    from batchdet.model.spec import MEAN, STD

    x = (planes.transpose(1, 2, 0).astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def measure_preprocessing(files: list[Path], threads: int, reps: int) -> dict:
    """decode → model input per image, against a bare Pillow decode of the same bytes."""
    from PIL import Image

    from batchdet.pipeline.inference import UINT8_INPUT
    from batchdet.pipeline.preprocess import normalize, prepare

    datas = [f.read_bytes() for f in files]
    in_graph = front_end_session(threads)
    buffer = np.empty((1, 3, 1200, 1200), np.float32)  # as the actor reuses one
    prepared = [prepare(d).image for d in datas]
    per_image = harness.min_per_item(
        {
            "bare_decode": lambda d: np.asarray(Image.open(io.BytesIO(d))),
            "prepare": prepare,
        },
        datas, reps,
    )
    normalise = harness.min_per_item(
        {
            "table": lambda x: normalize(x, buffer),
            "in_graph": lambda x: in_graph.run(None, {UINT8_INPUT: x[None]}),
            "mlperf_numpy": mlperf_numpy_normalise,
        },
        prepared, reps,
    )
    return {"images": len(datas), **preprocessing_figures(per_image, normalise, [len(d) for d in datas])}


def preprocessing_figures(per_image: dict[str, float], normalise: dict[str, float], sizes: list[int]) -> dict:
    """Milliseconds per image of each step from their seconds per image, and
    the target's ratio: ``prepare`` plus the table normalisation (what the
    actor does) over a bare decode of the same bytes (``sizes``: the JPEGs')."""
    total = per_image["prepare"] + normalise["table"]
    return {
        "jpeg_kb_mean": round(statistics.fmean(sizes) / 1e3, 1),
        "bare_decode_ms": per_image["bare_decode"] * 1e3,
        "prepare_ms": per_image["prepare"] * 1e3,
        "normalise_ms": normalise["table"] * 1e3,
        "normalise_in_graph_ms": normalise["in_graph"] * 1e3,
        "normalise_mlperf_numpy_ms": normalise["mlperf_numpy"] * 1e3,
        "total_ms": total * 1e3,
        "ratio_to_decode": total / per_image["bare_decode"],
    }


def rows(res: dict) -> list[tuple[str, str, str]]:
    pre = res["preprocess"]
    return [("preprocess: prepare + normalise", f"{pre['total_ms']:.2f} ms",
             f"{pre['prepare_ms']:.2f} + {pre['normalise_ms']:.2f} ms; {pre['ratio_to_decode']:.2f} x decode "
             f"(in-graph normalise, the GPU path: {pre['normalise_in_graph_ms']:.2f} ms)"),
            ("bare Pillow decode", f"{pre['bare_decode_ms']:.2f} ms", f"{pre['jpeg_kb_mean']} kB JPEG, 640x480")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="distinct images timed (default 20)")
    p.add_argument("--reps", type=int, default=5, help="tries per image; the fastest counts")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads of the in-graph normalisation (default: CPUs, at most 4)")
    p.add_argument("--workdir", help="images (default: work/ beside --out)")
    p.add_argument("--out", default="bench-out/preprocessing.json")
    p.add_argument("--quick", action="store_true", help="CI smoke: 3 images, 2 tries each")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.reps = min(args.images, 3), 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = harness.workdir(args)
    threads = harness.threads(args)
    started = time.time()
    res: dict = harness.header()
    res["config"] = {"images": args.images, "image_size": [harness.WIDTH, harness.HEIGHT], "reps": args.reps,
                     "threads": threads, "quick": args.quick, "command": harness.command(argv)}
    files = harness.synthesize(workdir / "images", args.images)
    print("preprocessing ...", flush=True)
    with harness.Phase(harness.own_cpu) as ph:
        res["preprocess"] = measure_preprocessing(files, threads, args.reps)
    res["preprocess"]["foreign_cpu_cores"] = ph.foreign_cores
    res["targets"] = harness.judge(TARGETS, {"preprocess_vs_decode": res["preprocess"]["ratio_to_decode"]},
                                   {"preprocess_vs_decode": ph.foreign_cores})
    res["elapsed_s"] = time.time() - started
    harness.write_report(Path(args.out), res, rows(res))
    return res


if __name__ == "__main__":
    main()

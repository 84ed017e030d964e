#!/usr/bin/env python
"""Preprocessing against a bare decode: what batchdet spends turning a file into the model's input.

Per image of the same synthesized 640×480 JPEGs: ``prepare`` (decode,
orient, float resize to 1200×1200, normalise, into the actor's reused
buffer) against a bare Pillow decode of the same bytes, and MLPerf's own
route (the decoded image as float32, ``cv2.resize`` of the interleaved
image, numpy's ``/255 - mean / std``, HWC→CHW) beside it as a yardstick.
Per image the fastest of ``--reps`` tries, interleaved; the target is a
ratio within this run.

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


def mlperf_route(data: bytes) -> np.ndarray:
    """MLPerf's ``pre_process_coco_resnet34`` after a Pillow decode, as a yardstick."""
    import cv2
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
    x = cv2.resize(rgb, (1200, 1200), interpolation=cv2.INTER_LINEAR)
    x = (x / 255. - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def measure_preprocessing(files: list[Path], reps: int) -> dict:
    """decode → model input per image, against a bare Pillow decode of the same bytes."""
    from PIL import Image

    from batchdet.pipeline.preprocess import prepare

    datas = [f.read_bytes() for f in files]
    buffer = np.empty((1, 3, 1200, 1200), np.float32)  # as the actor reuses one
    per_image = harness.min_per_item(
        {
            "bare_decode": lambda d: np.asarray(Image.open(io.BytesIO(d))),
            "prepare": lambda d: prepare(d, out=buffer),
            "mlperf_route": mlperf_route,
        },
        datas, reps,
    )
    return {"images": len(datas), **preprocessing_figures(per_image, [len(d) for d in datas])}


def preprocessing_figures(per_image: dict[str, float], sizes: list[int]) -> dict:
    """Milliseconds per image of each route from their seconds per image, and
    the target's ratio: ``prepare`` (what the actor does) over a bare decode
    of the same bytes (``sizes``: the JPEGs')."""
    return {
        "jpeg_kb_mean": round(statistics.fmean(sizes) / 1e3, 1),
        "bare_decode_ms": per_image["bare_decode"] * 1e3,
        "prepare_ms": per_image["prepare"] * 1e3,
        "mlperf_route_ms": per_image["mlperf_route"] * 1e3,
        "ratio_to_decode": per_image["prepare"] / per_image["bare_decode"],
    }


def rows(res: dict) -> list[tuple[str, str, str]]:
    pre = res["preprocess"]
    return [("preprocess: prepare", f"{pre['prepare_ms']:.2f} ms",
             f"{pre['ratio_to_decode']:.2f} x decode (MLPerf's own route: {pre['mlperf_route_ms']:.2f} ms)"),
            ("bare Pillow decode", f"{pre['bare_decode_ms']:.2f} ms", f"{pre['jpeg_kb_mean']} kB JPEG, 640x480")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="distinct images timed (default 20)")
    p.add_argument("--reps", type=int, default=5, help="tries per image; the fastest counts")
    p.add_argument("--workdir", help="images (default: work/ beside --out)")
    p.add_argument("--out", default="bench-out/preprocessing.json")
    p.add_argument("--quick", action="store_true", help="CI smoke: 3 images, 2 tries each")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.reps = min(args.images, 3), 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir, started, res = harness.begin(args)
    res["config"] = {"images": args.images, "image_size": [harness.WIDTH, harness.HEIGHT], "reps": args.reps,
                     "quick": args.quick, "command": harness.command(argv)}
    files = harness.synthesize(workdir / "images", args.images)
    print("preprocessing ...", flush=True)
    with harness.Phase(harness.own_cpu) as ph:
        res["preprocess"] = measure_preprocessing(files, args.reps)
    res["preprocess"]["foreign_cpu_cores"] = ph.foreign_cores
    res["targets"] = harness.judge(TARGETS, {"preprocess_vs_decode": res["preprocess"]["ratio_to_decode"]},
                                   {"preprocess_vs_decode": ph.foreign_cores})
    res["elapsed_s"] = time.time() - started
    harness.write_report(Path(args.out), res, rows(res))
    return res


if __name__ == "__main__":
    main()

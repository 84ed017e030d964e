#!/usr/bin/env python
"""Every engine x precision this machine can run, against onnxruntime FP32.

For each of onnxruntime fp32 / int8 and OpenVINO fp32 / int8 / bf16 that the
CPU and the installed packages allow (the others are listed with the reason
they cannot run), the model runs as ``detect`` runs it (batchdet's backends,
their settings, the same float input) on real photographs (tests/photos, or
``--photos``), image by image, every engine in turn, ``--rounds`` times:
seconds per image (median) and the speed-up over onnxruntime FP32. Beside
each, its agreement with FP32 on the same input: the fraction of FP32's
detections scoring above 0.3 that it matches (IoU >= 0.9, same label), and
the largest score difference of a matched pair. The INT8 copy is made as
``batchdet model quantize`` makes it, calibrated on the same photos.

With the random stand-in the agreement of detections measures the stand-in's
chaos as much as the precision; ``--smooth`` (the smooth stand-in, whose
detections hold still under noise) makes it a measurement of the precision,
still a proxy: real accuracy needs ``batchdet eval`` with the official
weights (docs/model.md, "Stand-ins"). The target is bf16's speed-up, a ratio
within this run, judged only on a CPU with bf16.

    python benchmarks/precision.py --smooth --out bench-out/precision.json
    python benchmarks/precision.py --quick --out bench-out/precision-quick.json   # CI smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import harness
from batchdet.model.spec import INPUT_SIZE

TARGETS = {"bf16_speedup": (">=", 1.8)}
#: the repository's test photographs (tests/photos): real scenes, several sizes
PHOTOS = ("rocket.jpg", "astronaut.png", "coffee.png", "chelsea.png", "ihc.png", "retina.jpg",
          "hubble_deep_field.jpg", "camera.png")
MIN_SCORE = 0.3
MIN_IOU = 0.9
BASELINE = ("onnxruntime", "fp32")


# --- arithmetic (pure; tests/test_bench.py) ----------------------------------------------
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (x_min, y_min, x_max, y_max)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # float32 would put IoU 0.9 below 0.9
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def agreement(reference: dict, candidate: dict, min_score: float = MIN_SCORE, min_iou: float = MIN_IOU) -> dict:
    """How far ``candidate``'s detections of an image (``bboxes`` [N, 4], normalised,
    ``labels``, ``scores``) agree with ``reference``'s: of the reference's detections
    scoring above ``min_score``, how many a candidate detection of the same label
    overlaps by IoU >= ``min_iou`` (``matched`` of ``wanted``); between a matched
    detection and its best-overlapping match, the largest score difference and the
    largest difference of a box edge in pixels of the 1200 input (None: nothing matched)."""
    keep = reference["scores"] > min_score
    ref_boxes, ref_labels, ref_scores = reference["bboxes"][keep], reference["labels"][keep], reference["scores"][keep]
    if not len(ref_scores):
        return {"wanted": 0, "matched": 0, "max_score_diff": None, "max_box_diff_px": None}
    iou = box_iou(ref_boxes, candidate["bboxes"])
    iou = np.where(ref_labels[:, None] == candidate["labels"][None, :], iou, 0.0)
    matched = np.flatnonzero(iou.max(axis=1, initial=0.0) >= min_iou)
    pair = iou[matched].argmax(axis=1) if len(matched) else np.zeros(0, np.int64)
    score_diffs = np.abs(ref_scores[matched].astype(np.float64) - candidate["scores"][pair])
    box_diffs = np.abs(ref_boxes[matched].astype(np.float64) - candidate["bboxes"][pair]).max(axis=1, initial=0.0)
    worst = lambda d: float(d.max()) if len(d) else None  # noqa: E731
    return {"wanted": int(len(ref_scores)), "matched": int(len(matched)), "max_score_diff": worst(score_diffs),
            "max_box_diff_px": worst(box_diffs * INPUT_SIZE)}


def summarise(records: list[dict]) -> list[dict]:
    """One line per engine x precision from its ``times`` (s per image) and per-image
    ``agreements`` (:func:`agreement`): median s/image, speed-up over onnxruntime fp32
    (its median over this one's), the fraction of FP32's detections matched over all
    images, the largest score and box differences; an unavailable one keeps its ``reason``."""
    base = next(statistics.median(r["times"]) for r in records if (r["engine"], r["precision"]) == BASELINE)
    lines = []
    for r in records:
        line = {"engine": r["engine"], "precision": r["precision"]}
        if r.get("reason"):
            lines.append({**line, "reason": r["reason"]})
            continue
        s = statistics.median(r["times"])
        wanted = sum(a["wanted"] for a in r["agreements"])
        worst = lambda key: max((a[key] for a in r["agreements"] if a[key] is not None), default=None)  # noqa: E731
        lines.append({**line, "s_per_image": s, "speedup": base / s, "wanted": wanted,
                      "matched": sum(a["matched"] for a in r["agreements"]),
                      "agreement": sum(a["matched"] for a in r["agreements"]) / wanted if wanted else None,
                      "max_score_diff": worst("max_score_diff"), "max_box_diff_px": worst("max_box_diff_px")})
    return lines


def rows(lines: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    for line in lines:
        name = f"{line['engine']} {line['precision']}"
        if "reason" in line:
            out.append((name, "-", f"not run: {line['reason']}"))
            continue
        agree = "n/a" if line["agreement"] is None else f"{line['agreement']:.1%} of {line['wanted']}"
        diff = "n/a" if line["max_score_diff"] is None else f"{line['max_score_diff']:.4f}"
        box = "n/a" if line["max_box_diff_px"] is None else f"{line['max_box_diff_px']:.2f} px"
        out.append((name, f"{line['s_per_image']:.3f} s/image",
                    f"x{line['speedup']:.2f} fp32; agreement with fp32 {agree} (score > {MIN_SCORE}, IoU >= "
                    f"{MIN_IOU}, same label), max score diff {diff}, max box diff {box}"))
    return out


# --- measuring ---------------------------------------------------------------------------------
def candidates(model: Path, int8: Path | None) -> list[dict]:
    """Every engine x precision, each with its model file or the reason it cannot run here."""
    from batchdet.cpu import present
    from batchdet.pipeline.precision import BF16_FLAGS, check_bf16_cpu, openvino_version

    def reason(check) -> str | None:
        try:
            check()
        except ValueError as e:
            return str(e)
        return None

    def need_openvino() -> None:
        if openvino_version() is None:
            raise ValueError("OpenVINO is not installed (pip install 'batchdet[openvino]')")

    def need_int8() -> None:
        if int8 is None:
            raise ValueError("no INT8 copy (--int8 none)")

    return [
        {"engine": "onnxruntime", "precision": "fp32", "model": model, "reason": None},
        {"engine": "onnxruntime", "precision": "int8", "model": int8, "reason": reason(need_int8)},
        {"engine": "openvino", "precision": "fp32", "model": model, "reason": reason(need_openvino)},
        {"engine": "openvino", "precision": "int8", "model": int8,
         "reason": reason(need_openvino) or reason(need_int8)},
        {"engine": "openvino", "precision": "bf16", "model": model,
         "reason": reason(lambda: check_bf16_cpu(present(BF16_FLAGS))) or reason(need_openvino)},
    ]


def measure(runs: list[dict], images: list[np.ndarray], rounds: int, threads: int) -> list[dict]:
    """Each runnable entry of ``runs`` timed image by image in turn (``rounds`` times,
    after one untimed run each), and its detections compared with onnxruntime fp32's."""
    from batchdet.pipeline.backend import make_backend
    from batchdet.pipeline.precision import Choice
    from batchdet.pipeline.speedup import time_interleaved

    live = [r for r in runs if not r["reason"]]
    backends = [make_backend(Choice(r["engine"], r["precision"]), r["model"], threads).load() for r in live]
    outputs = [[vars(b.predict(x)) for x in images] for b in backends]  # also the untimed first runs
    times = time_interleaved(backends, images, rounds, warm=False)
    reference = outputs[0]
    for r, spent, found in zip(live, times, outputs):
        r["times"] = spent
        r["agreements"] = [agreement(ref, got) for ref, got in zip(reference, found)]
        print(f"  {r['engine']} {r['precision']}: {statistics.median(spent):.3f} s/image", flush=True)
    return [{k: v for k, v in r.items() if k != "model"} for r in runs]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p, "bench-out/precision.json")
    p.add_argument("--int8", default="auto", help="'auto' quantizes the model on the photos; 'none' skips INT8; "
                                                  "a path uses that INT8 file")
    p.add_argument("--photos", help="folder of JPEG/PNG photos (default: the repository's tests/photos)")
    p.add_argument("--images", type=int, default=4, help="photos timed and compared")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over the photos")
    p.add_argument("--threads", type=int, default=0, help="threads per engine (default: CPUs, at most 4)")
    p.add_argument("--bare-nice", type=int, default=harness.RAY_WORKER_NICENESS,
                   help="niceness of the loops (default: Ray's worker niceness, 15)")
    p.add_argument("--quick", action="store_true", help="CI smoke: narrow stand-in (divisor 16), 2 photos, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        harness.quick_model(args)
        args.images, args.rounds = 2, 1
    return args


def main(argv=None) -> dict:
    from batchdet.model.quantize import quantize_model
    from batchdet.pipeline.speedup import model_inputs

    args = parse_args(argv)
    workdir, started, res = harness.begin(args)
    threads = harness.threads(args)
    model = harness.resolve_model(args, workdir)
    files = harness.photo_files(args.photos, PHOTOS, args.images)
    res["config"] = {**harness.model_config(args, model), "photos": [f.name for f in files], "rounds": args.rounds,
                     "threads": threads, "quick": args.quick, "command": harness.command(argv)}
    int8 = None
    if args.int8 == "auto":
        print("quantizing ...", flush=True)
        int8 = quantize_model(model, harness.dataset_folder(workdir, files, len(files)), images=len(files),
                              to=workdir / (model.stem + ".int8.onnx"))
    elif args.int8 != "none":
        int8 = Path(args.int8)
    images = model_inputs([str(f) for f in files])
    bare = harness.niced_executor(args.bare_nice)
    with harness.Phase(harness.own_cpu) as phase:
        records = bare.submit(measure, candidates(model, int8), images, args.rounds, threads).result()
    bare.shutdown()
    res["records"] = records
    res["lines"] = summarise(records)
    res["foreign_cpu_cores"] = phase.foreign_cores
    bf16 = next((line for line in res["lines"] if line["precision"] == "bf16" and "speedup" in line), None)
    res["targets"] = harness.judge(TARGETS, {"bf16_speedup": bf16 and bf16["speedup"]},
                                   {"bf16_speedup": phase.foreign_cores})
    res["elapsed_s"] = time.time() - started
    harness.write_report(Path(args.out), res, rows(res["lines"]))
    return res


if __name__ == "__main__":
    main()

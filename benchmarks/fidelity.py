#!/usr/bin/env python
"""batchdet detect against MLPerf's own maths, image by image, on real photographs.

``batchdet detect`` (``batchdet.api.detect``, in-process by default) runs over
real photographs (the repository's tests/photos, or ``--photos``) and writes its Parquet
output; an independent single-process path written from MLPerf's published
code (tests/helpers/mlperf_reference.py: ``cv2.imread``,
``pre_process_coco_resnet34``, onnxruntime, ``PostProcessCocoOnnx`` with
``--use-inv-map``, boxes scaled to the original size) runs over the same files
with the same model. Each of the reference's detections (score >= 0.5) is
looked for among batchdet's of that image: found when one has the same COCO
label, every box edge within 1 px and the score within 1e-3. The figure is the
fraction found over all images (target >= 99 %); every detection not found is
listed with batchdet's nearest one.

The model is the smooth stand-in (built once into the cache) or ``--model``:
the random stand-in's detections move under any change of the arithmetic
(docs/model.md, "Stand-ins"), so it would measure its own chaos, not batchdet.

    python benchmarks/fidelity.py --out bench-out/fidelity.json
    python benchmarks/fidelity.py --quick --out bench-out/fidelity-quick.json   # CI smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.HERE.parent))  # the repository: the reference lives with the tests' helpers
from tests.helpers.mlperf_reference import SCORE_THRESHOLD, read_image, reference_detections  # noqa: E402
from tests.helpers.photos import REAL_PHOTOS  # noqa: E402

TARGETS = {"agreement": (">=", 0.99)}
BOX_PX = 1.0
SCORE_DIFF = 1e-3
EDGES = ("x_min", "y_min", "x_max", "y_max")
#: why a reference detection was not found (see match_image)
REASONS = ("score", "box", "label")
DATASET = "photos"


# --- arithmetic (pure; tests/test_bench.py) ----------------------------------------------
def clip_box(detection: dict, width: int, height: int) -> dict:
    """``detection`` with its box clipped to [0, width] x [0, height]."""
    bounds = {"x_min": width, "y_min": height, "x_max": width, "y_max": height}
    return {**detection, **{k: min(max(detection[k], 0.0), bounds[k]) for k in EDGES}}


def box_diff(a: dict, b: dict) -> float:
    """The largest difference of a box edge between two detections, in pixels."""
    return max(abs(a[k] - b[k]) for k in EDGES)


def match_image(uri: str, reference: list[dict], found: list[dict], width: int, height: int,
                box_px: float = BOX_PX, score_diff: float = SCORE_DIFF) -> dict:
    """How many of one image's ``reference`` detections batchdet ``found``.

    The reference's boxes are clipped to the image ([0, width] x [0, height])
    first: batchdet clips its boxes to the image and MLPerf's finalize does
    not, and a box edge straying outside says nothing about the arithmetic.
    Greedy and one-to-one, in the reference's order (score high to low): a
    reference detection takes the closest unused batchdet detection with the
    same ``label_id``, every edge within ``box_px`` and the score within
    ``score_diff``. Returns the counts, the worst box and score differences of
    the pairs (None: no pair), and each detection not found with why, among
    batchdet's detections not yet taken (``score``: one of its label within
    ``box_px``, none with the score close enough; ``box``: of its label, none
    within ``box_px``; ``label``: none of its label) and batchdet's nearest
    detection by box (any label, taken or not; None when batchdet has none)."""
    used: set[int] = set()
    box_diffs, score_diffs, unmatched = [], [], []
    for ref in (clip_box(d, width, height) for d in reference):
        same_label = [(box_diff(ref, c), abs(ref["score"] - c["score"]), i) for i, c in enumerate(found)
                      if i not in used and c["label_id"] == ref["label_id"]]
        fits = [f for f in same_label if f[0] <= box_px and f[1] <= score_diff]
        if fits:
            box, score, i = min(fits)
            used.add(i)
            box_diffs.append(box)
            score_diffs.append(score)
            continue
        nearest = min(found, key=lambda c: box_diff(ref, c), default=None)
        reason = ("score" if any(f[0] <= box_px for f in same_label) else "box" if same_label else "label")
        unmatched.append({"uri": uri, **_brief(ref), "reason": reason,
                          "nearest": nearest and {**_brief(nearest), "box_diff_px": box_diff(ref, nearest)}})
    return {"uri": uri, "reference": len(reference), "found": len(box_diffs),
            "max_box_diff_px": max(box_diffs, default=None), "max_score_diff": max(score_diffs, default=None),
            "unmatched": unmatched}


def _brief(d: dict) -> dict:
    """What a listed difference shows of a detection: its label, score and box."""
    return {"label_id": d["label_id"], "score": d["score"], "box": [d[k] for k in EDGES]}


def summarise(matches: list[dict]) -> dict:
    """:func:`match_image`'s records pooled: images, reference detections, found,
    the fraction found (None: the reference had none), the worst differences of
    all pairs, how many were not found for each reason and every one of them."""
    worst = lambda key: max((m[key] for m in matches if m[key] is not None), default=None)  # noqa: E731
    reference, found = sum(m["reference"] for m in matches), sum(m["found"] for m in matches)
    unmatched = [u for m in matches for u in m["unmatched"]]
    return {"images": len(matches), "reference_detections": reference, "found": found,
            "agreement": found / reference if reference else None, "max_box_diff_px": worst("max_box_diff_px"),
            "max_score_diff": worst("max_score_diff"),
            "not_found_by_reason": {r: sum(u["reason"] == r for u in unmatched) for r in REASONS},
            "unmatched": unmatched}


def rows(summary: dict) -> list[tuple[str, str, str]]:
    """The report's table: the pooled figures, then one row per detection not found."""
    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    out = [("images", str(summary["images"]), ""),
           ("reference detections", str(summary["reference_detections"]),
            f"MLPerf's path, score >= {SCORE_THRESHOLD}"),
           ("found by batchdet", str(summary["found"]),
            f"same label, every edge within {BOX_PX} px, score within {SCORE_DIFF}"),
           ("agreement", num(summary["agreement"], ".2%"), "found / reference detections"),
           ("worst box diff", num(summary["max_box_diff_px"], ".4f") + " px", "among the pairs found"),
           ("worst score diff", num(summary["max_score_diff"], ".2e"), "among the pairs found"),
           ("not found", str(len(summary["unmatched"])),
            ", ".join(f"{n} {r}" for r, n in summary["not_found_by_reason"].items()) + "; listed below")]
    for u in summary["unmatched"]:
        n = u["nearest"]
        near = "batchdet has none" if n is None else (f"nearest: label {n['label_id']} score {n['score']:.4f} "
                                                      f"box {_px(n['box'])} ({n['box_diff_px']:.2f} px off)")
        out.append((f"  {Path(u['uri']).name}", f"label {u['label_id']} score {u['score']:.4f}",
                    f"{u['reason']}: box {_px(u['box'])}; {near}"))
    return out


def _px(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


# --- measuring ---------------------------------------------------------------------------------
def batchdet_rows(output: Path) -> dict[str, dict]:
    """The output's rows by file name (a fresh output: one row per image)."""
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["uri", "status", "error", "detections"])
    return {Path(row["uri"]).name: row for row in table.to_pylist()}


def compare(model: Path, files: list[Path], output: Path) -> list[dict]:
    """Each file's reference detections against its row in batchdet's ``output`` (an error row, or none, finds nothing)."""
    found = batchdet_rows(output)
    matches = []
    for f in files:
        height, width = read_image(f).shape[:2]
        row = found.get(f.name) or {"status": "absent", "error": "no row", "detections": None}
        if row["status"] != "ok":
            print(f"  {f.name}: batchdet {row['status']}: {row['error']}", flush=True)
        reference = reference_detections(model, f)
        m = match_image(str(f), reference, row["detections"] or [], width, height)
        print(f"  {f.name}: {m['found']} of {m['reference']} found", flush=True)
        matches.append(m)
    return matches


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p, "bench-out/fidelity.json")
    p.add_argument("--photos", help="folder of JPEG/PNG photos (default: the repository's tests/photos)")
    p.add_argument("--images", type=int, default=len(REAL_PHOTOS), help="photos compared (the first N)")
    p.add_argument("--execution", default="in-process", choices=("in-process", "ray"), help="detect's --execution")
    p.add_argument("--quick", action="store_true", help="CI smoke: narrow smooth stand-in (divisor 16), 3 photos")
    args = p.parse_args(argv)
    args.smooth = True  # always: the random stand-in's detections measure its chaos (see above)
    if args.quick:
        harness.quick_model(args)
        args.images = min(args.images, 3)
    return args


def main(argv=None) -> dict:
    from batchdet.api import detect

    args = parse_args(argv)
    workdir, started, res = harness.begin(args)
    model = harness.resolve_model(args, workdir)
    files = harness.photo_files(args.photos, REAL_PHOTOS, args.images)
    res["config"] = {**harness.model_config(args, model), "photos": [f.name for f in files],
                     "execution": args.execution, "box_px": BOX_PX, "score_diff": SCORE_DIFF,
                     "reference_score_threshold": SCORE_THRESHOLD, "quick": args.quick,
                     "command": harness.command(argv)}
    output = workdir / "fidelity-output"
    print(f"batchdet detect over {len(files)} photos ({args.execution}) ...", flush=True)
    detect({DATASET: str(harness.dataset_folder(workdir, files, len(files)))}, str(output), model=str(model),
           execution=args.execution, overwrite=True)
    print("MLPerf's path over the same files ...", flush=True)
    res["images"] = compare(model, files, output)
    summary = summarise(res["images"])
    res["summary"] = summary
    # not a timing: others' load cannot move it
    res["targets"] = harness.judge(TARGETS, {"agreement": summary["agreement"]}, {"agreement": 0.0})
    res["elapsed_s"] = time.time() - started
    harness.write_report(Path(args.out), res, rows(summary))
    return res


if __name__ == "__main__":
    main()

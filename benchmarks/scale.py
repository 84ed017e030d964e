"""The driver-side steps of a run at scale, without Ray: commit, --resume
planning and manifest listing at N images (issue 16, item 3).

For each N it stages N rows as the pipeline would (``_staging/<run_id>/_run.json``
and ``dataset=<NAME>/<uuid>.parquet`` files of ``--rows-per-file`` rows, 5-20
detections per ok image, ~2% error rows, and one file written twice, as a
retried write task leaves it), writes an N-line manifest of the same URIs, then
runs each step in a fresh Python process and records its wall time and the
process's peak RSS (VmHWM, which includes the imports: ``baseline_rss_mb``
is that of a process that only imported):

- ``commit``: ``writing.finish_run`` on the staged run;
- ``listing``: ``listing.list_images`` on the N-line manifest;
- ``resume``: what ``--resume`` does on the driver: list the manifest,
  ``writing.done_uris`` over the committed output, ``RunPlan.without``.

    python benchmarks/scale.py --sizes 10000,100000,1000000 --json scale.json

Targets at 1M on a 2-core machine: driver RSS <= 1.5 GB, commit <= 2 min,
resume planning <= 2 min.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

RUN_ID = "20250101T000000Z-abcdef"
MODEL_SHA = "0" * 64
DATASET = "big"
LABELS = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light"]
TARGETS = {"rss_mb": 1536, "commit_s": 120, "resume_s": 120}


def _uris(n: int) -> list[str]:
    return [f"/data/photos/{i // 1000:04d}/img{i:07d}.jpg" for i in range(n)]


def _table(uris: list[str], rng: np.random.Generator, error_rate: float) -> pa.Table:
    """Rows like the pipeline's: ok rows with 5-20 detections, error rows with null detections."""
    from batchdet.output.schema import DETECTION_TYPE, FILE_SCHEMA

    n = len(uris)
    error = rng.random(n) < error_rate
    counts = np.where(error, 0, rng.integers(5, 21, n))
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    label_ids = rng.integers(0, len(LABELS), total).astype(np.int32)
    corners = rng.random((4, total), dtype=np.float32) * 640
    struct = pa.StructArray.from_arrays(
        [pa.array(label_ids + 1), pa.DictionaryArray.from_arrays(pa.array(label_ids), pa.array(LABELS)).cast(pa.string()),
         pa.array(np.sort(rng.random(total, dtype=np.float32))[::-1].copy()),
         pa.array(np.minimum(corners[0], corners[2])), pa.array(np.minimum(corners[1], corners[3])),
         pa.array(np.maximum(corners[0], corners[2])), pa.array(np.maximum(corners[1], corners[3]))],
        fields=list(DETECTION_TYPE))
    detections = pa.ListArray.from_arrays(pa.array(offsets), struct, mask=pa.array(error))
    return pa.table({
        "uri": pa.array(uris),
        "width": pa.array(np.where(error, None, 640), type=pa.int32()),
        "height": pa.array(np.where(error, None, 480), type=pa.int32()),
        "status": pa.array(np.where(error, "error", "ok")),
        "error": pa.array([("DecodeError: not an image" if e else None) for e in error], type=pa.string()),
        "detections": detections,
        "run_id": pa.array([RUN_ID] * n),
    }, schema=FILE_SCHEMA)


def stage(out: Path, n: int, rows_per_file: int, seed: int = 0, error_rate: float = 0.02) -> dict:
    """Stage ``n`` rows in ``out`` as a run would; return what a correct commit must count."""
    import pyarrow.parquet as pq

    from batchdet.output.layout import RUN_RECORD, STAGING_DIR

    rng = np.random.default_rng(seed)
    stage_dir = out / STAGING_DIR / RUN_ID
    folder = stage_dir / f"dataset={DATASET}"
    folder.mkdir(parents=True)
    record = {"run_id": RUN_ID, "started": "2025-01-01T00:00:00+00:00",
              "model": {"path": "bench.onnx", "sha256": MODEL_SHA, "official": False, "kind": "bench", "kind_id": "other"},
              "datasets": {DATASET: {"url": str(out / "manifest.txt"), "skipped_files": 0, "listing_seconds": 0.0,
                                     "already_done": 0}},
              "arguments": {}, "versions": {}}
    (stage_dir / RUN_RECORD).write_text(json.dumps(record))
    uris = _uris(n)
    expected = {"images": 0, "images_ok": 0, "images_error": 0, "detections": 0, "files": 0}
    step = 200_000  # rows generated at a time: the generator's own memory stays bounded
    first = None
    for start in range(0, n, step):
        table = _table(uris[start:start + step], rng, error_rate)
        expected["images"] += table.num_rows
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
        expected["images_ok"] += int(ok.sum())
        expected["images_error"] += int((~ok).sum())
        expected["detections"] += int(sum(c.value_lengths().fill_null(0).to_numpy().sum()
                                          for c in table.column("detections").chunks))
        for i in range(0, table.num_rows, rows_per_file):
            part = table.slice(i, rows_per_file)
            name = folder / f"{uuid.uuid4().hex}.parquet"
            pq.write_table(part, name)
            first = first or name
            expected["files"] += 1
    # a retried write task: the same rows again under another name (the commit keeps one copy)
    shutil.copyfile(first, folder / f"{uuid.uuid4().hex}.parquet")
    (out / "manifest.txt").write_text("\n".join(uris) + "\n")
    return expected


# --- the steps, each run in a fresh process -------------------------------------------------------------
def _step_baseline(out: Path) -> dict:
    from batchdet.pipeline import listing, plan, writing  # noqa: F401  the imports every step pays

    return {}


def _step_commit(out: Path) -> dict:
    from batchdet.pipeline.writing import Output, finish_run

    result = finish_run(Output(str(out)), RUN_ID)
    c = result.datasets[DATASET]
    return {"images": c.images, "images_ok": c.images_ok, "images_error": c.images_error,
            "detections": c.detections, "files": len(result.files)}


def _step_listing(out: Path) -> dict:
    from batchdet.pipeline.listing import list_images

    listing = list_images(str(out / "manifest.txt"))
    return {"uris": len(listing.uris)}


def _step_resume(out: Path) -> dict:
    from batchdet.model.spec import ModelInfo
    from batchdet.options import DetectOptions
    from batchdet.pipeline.listing import list_images
    from batchdet.pipeline.plan import RunPlan
    from batchdet.pipeline.writing import Output, done_uris

    manifest = str(out / "manifest.txt")
    listing = list_images(manifest)
    plan = RunPlan(run_id="next", options=DetectOptions({DATASET: manifest}, str(out)), listings={DATASET: listing},
                   model=ModelInfo(path="bench.onnx", size=0, sha256=MODEL_SHA, parameters=0, opset=0, input_shape=()))
    t = time.perf_counter()
    done = done_uris(Output(str(out)), MODEL_SHA)
    todo = plan.without(done)
    return {"done": sum(len(v) for v in done.values()), "todo": todo.num_images,
            "done_uris_and_without_s": round(time.perf_counter() - t, 3)}


STEPS = {"baseline": _step_baseline, "commit": _step_commit, "listing": _step_listing, "resume": _step_resume}


def _child(step: str, out: str) -> None:
    start = time.perf_counter()
    figures = STEPS[step](Path(out))
    seconds = time.perf_counter() - start
    print(json.dumps({"step": step, "seconds": round(seconds, 3), "rss_mb": round(peak_rss_kb() / 1024, 1), **figures}))


def peak_rss_kb() -> int:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux
    carries ``ru_maxrss`` over fork and exec, so a step would report the
    parent's peak (the staging) instead of its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux


def run_step(step: str, out: Path) -> dict:
    """``step`` in a fresh interpreter; its own time and peak RSS."""
    proc = subprocess.run([sys.executable, __file__, "--child", step, str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(n: int, rows_per_file: int, workdir: Path) -> dict:
    out = workdir / f"out-{n}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t = time.perf_counter()
    expected = stage(out, n, rows_per_file)
    staging_s = time.perf_counter() - t
    steps = {step: run_step(step, out) for step in ("baseline", "commit", "listing", "resume")}
    shutil.rmtree(out)
    driver_steps = [steps["commit"], steps["resume"], steps["listing"]]
    return {"n": n, "rows_per_file": rows_per_file, "staged_files": expected["files"] + 1,
            "staging_s": round(staging_s, 1), "expected": expected, "steps": steps,
            "peak_rss_mb": max(s["rss_mb"] for s in driver_steps),
            "meets_targets": {"rss": max(s["rss_mb"] for s in driver_steps) <= TARGETS["rss_mb"],
                              "commit": steps["commit"]["seconds"] <= TARGETS["commit_s"],
                              "resume": steps["resume"]["seconds"] <= TARGETS["resume_s"]}}


def table(results: list[dict]) -> str:
    lines = [f"{'N':>9} {'files':>7} | {'commit s':>9} {'MB':>6} | {'resume s':>9} {'MB':>6} | "
             f"{'listing s':>9} {'MB':>6} | {'baseline MB':>11}"]
    for r in results:
        s = r["steps"]
        lines.append(f"{r['n']:>9} {r['staged_files']:>7} | {s['commit']['seconds']:>9.2f} {s['commit']['rss_mb']:>6.0f} | "
                     f"{s['resume']['seconds']:>9.2f} {s['resume']['rss_mb']:>6.0f} | "
                     f"{s['listing']['seconds']:>9.2f} {s['listing']['rss_mb']:>6.0f} | {s['baseline']['rss_mb']:>11.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N")
    p.add_argument("--rows-per-file", type=int, default=64, help="rows per staged file (the pipeline's default: 64)")
    p.add_argument("--json", dest="json_out", help="write the figures here")
    p.add_argument("--workdir", help="where to stage (default: a temporary folder)")
    p.add_argument("--child", nargs=2, metavar=("STEP", "OUTPUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="batchdet-scale-"))
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(measure(n, args.rows_per_file, workdir))
            print(table(results[-1:]).splitlines()[-1] if len(results) > 1 else table(results), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {"targets": TARGETS, "cpus": os.cpu_count(), "results": results}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

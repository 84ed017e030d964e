"""The driver-side steps of a run at scale, without Ray: commit, --resume
planning and manifest listing at N images (issue 16, item 3; issue 21, item 6).

For each N it stages N rows as the pipeline would (``_staging/<run_id>/_run.json``
and ``dataset=<NAME>/<uuid>.parquet`` files of ``--rows-per-file`` rows, 5-20
detections per ok image, ~2% error rows, and one file written twice, as a
retried write task leaves it; every row with its content identity: size,
sha256 and an S3-like ETag version token), writes an N-line manifest of the
same URIs, then runs each step in a fresh Python process and records its wall
time and the process's peak RSS (VmHWM, which includes the imports:
``baseline_rss_mb`` is that of a process that only imported):

- ``commit``: ``writing.finish_run`` on the staged run;
- ``listing``: ``listing.list_images`` on the N-line manifest;
- ``resume``: what ``--resume`` does on the driver once the inputs are listed
  (listing a real bucket is ``benchmarks/listing.py``'s): the listing of the
  inputs as they are now, with sizes and version tokens (read from a Parquet
  file the benchmark wrote: 100 images per million changed, that is
  re-uploaded with a new ETag, 100 new and 100 deleted, at least one each),
  ``update.plan_update`` over the committed output, and ``update.stage_gone``
  for the deleted ones. The plan's counts are checked against what was
  changed: unchanged = ok rows − changed − deleted, retried = the error rows
  (unchanged + retried = N − 200 at 1M), changed = new = gone = 100.

    python benchmarks/scale.py --sizes 10000,100000,1000000 --json scale.json

Targets at 1M on a 2-core machine: driver RSS <= 1.5 GB, commit <= 2 min,
resume planning <= 2 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (machine, commit, how busy the rest of the machine was)

RUN_ID = "20250101T000000Z-abcdef"
MODEL_SHA = "0" * 64
DATASET = "big"
LABELS = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light"]
TARGETS = {"rss_mb": 1536, "commit_s": 120, "resume_s": 120}
#: Images changed (re-uploaded), new and deleted per million before the update is planned.
CHANGES_PER_MILLION = 100
#: The inputs as listed now, with sizes and version tokens (written inside the output folder,
#: outside any ``dataset=`` partition, so no reader of the output sees it).
LISTING_NOW = "listing-now.parquet"


def _uris(n: int, first: int = 0) -> list[str]:
    return [f"/data/photos/{i // 1000:04d}/img{i:07d}.jpg" for i in range(first, first + n)]


def changes(n: int) -> int:
    """How many images are changed, added and deleted (each) before planning an update of ``n``."""
    return max(1, round(CHANGES_PER_MILLION * n / 1_000_000))


def _identity(index: np.ndarray, generation: int = 0) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Size, sha256 and version token (an ETag) of the images numbered ``index``;
    ``generation`` 1: the same image uploaded again with other bytes."""
    shas = [hashlib.sha256(b"%d/%d" % (i, generation)).hexdigest() for i in index.tolist()]
    return (pa.array(40_000 + index * 7919 % 160_000, pa.int64()), pa.array(shas, pa.string()),
            pa.array([f"ETag:{sha[:32]}" for sha in shas], pa.string()))


def _table(uris: list[str], first: int, rng: np.random.Generator, error_rate: float) -> pa.Table:
    """Rows like the pipeline's, of images ``first``..: ok rows with 5-20
    detections, error rows (undecodable bytes) with null detections, all with
    their content identity."""
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
        **dict(zip(("size", "sha256", "version"), _identity(np.arange(first, first + n)))),
        "copied_from": pa.nulls(n, pa.string()),
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
    oks = []
    for start in range(0, n, step):
        table = _table(uris[start:start + step], start, rng, error_rate)
        expected["images"] += table.num_rows
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
        oks.append(ok)
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
    expected["update"] = write_listing_now(out / LISTING_NOW, uris, np.concatenate(oks))
    return expected


def write_listing_now(path: Path, uris: list[str], ok: np.ndarray) -> dict[str, int]:
    """The inputs as they are now: ``changes(n)`` ok images re-uploaded (a new
    ETag, the same size), as many deleted and as many added, spread over the
    output; return the counts a correct update plan gives."""
    import pyarrow.parquet as pq

    n, k = len(uris), changes(len(uris))
    picks = np.flatnonzero(ok)[np.linspace(0, int(ok.sum()) - 1, 2 * k).round().astype(np.int64)]
    changed, gone = picks[0::2], picks[1::2]
    sizes, _, versions = _identity(np.arange(n))
    versions = versions.to_numpy(zero_copy_only=False)
    versions[changed] = _identity(changed, generation=1)[2].to_numpy(zero_copy_only=False)
    keep = np.ones(n, dtype=bool)
    keep[gone] = False
    new_sizes, _, new_versions = _identity(np.arange(n, n + k))
    pq.write_table(pa.table({
        "uri": pa.concat_arrays([pa.array(uris).filter(pa.array(keep)), pa.array(_uris(k, first=n))]),
        "size": pa.concat_arrays([sizes.filter(pa.array(keep)), new_sizes]),
        "version": pa.concat_arrays([pa.array(versions[keep], pa.string()), new_versions])}), path)
    return {"unchanged": int(ok.sum()) - 2 * k, "new": k, "retried": int((~ok).sum()), "changed": k, "gone": k}


# --- the steps, each run in a fresh process -------------------------------------------------------------
def _step_baseline(out: Path) -> dict:
    from batchdet.pipeline import listing, plan, update, writing  # noqa: F401  the imports every step pays

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
    import pyarrow.parquet as pq

    from batchdet.output.layout import Output
    from batchdet.pipeline.listing import Listing
    from batchdet.pipeline.update import plan_update, stage_gone

    now = pq.read_table(out / LISTING_NOW)
    listing = Listing(str(out / "photos"), now.column("uri").to_pylist(), 0, 0.0,
                      sizes=now.column("size").to_pylist(), versions=now.column("version").to_pylist())
    del now
    t = time.perf_counter()
    update = plan_update(Output(str(out)), {DATASET: listing})
    planned = time.perf_counter() - t
    stage_gone(Output(str(out)), "next", update.gone)
    return {**dataclasses.asdict(update.counts[DATASET]), "todo": len(update.todo[DATASET].uris),
            "known": len(update.known or ()), "plan_update_s": round(planned, 3)}


STEPS = {"baseline": _step_baseline, "commit": _step_commit, "listing": _step_listing, "resume": _step_resume}


def _child(step: str, out: str) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    figures = STEPS[step](Path(out))
    seconds = time.perf_counter() - start
    print(json.dumps({"step": step, "seconds": round(seconds, 3), "cpu_s": round(time.process_time() - cpu, 3),
                      "rss_mb": round(harness.peak_rss_kb() / 1024, 1), **figures}))


def run_step(step: str, out: Path) -> dict:
    """``step`` in a fresh interpreter; its own wall time, CPU time (all its
    threads: DuckDB's too) and peak RSS, and the cores other processes than
    it and this one used meanwhile (on a shared machine, wall time is what
    the CPU left by others allowed)."""
    with harness.Phase(harness.own_and_children_cpu) as phase:
        proc = subprocess.run([sys.executable, __file__, "--child", step, str(out)],
                              capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "others_cores": round(phase.foreign_cores, 2)}


def measure_size(n: int, rows_per_file: int, workdir: Path) -> dict:
    out = workdir / f"out-{n}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t = time.perf_counter()
    expected = stage(out, n, rows_per_file)
    staging_s = time.perf_counter() - t
    steps = {step: run_step(step, out) for step in ("baseline", "commit", "listing", "resume")}
    shutil.rmtree(out)
    return size_figures(n, rows_per_file, expected, steps, staging_s)


def size_figures(n: int, rows_per_file: int, expected: dict, steps: dict[str, dict], staging_s: float) -> dict:
    """One size's figures from its steps' records: the driver's peak RSS
    (the largest of the steps'), the most cores others used, each target
    judged. Fails if the update plan's counts are not the ones staged."""
    planned = {state: steps["resume"][state] for state in expected["update"]}
    if planned != expected["update"]:
        raise RuntimeError(f"the update plan of {n} rows counted {planned}, not {expected['update']}")
    rss = max(steps[s]["rss_mb"] for s in ("commit", "resume", "listing"))
    return {"n": n, "rows_per_file": rows_per_file, "staged_files": expected["files"] + 1,
            "staging_s": round(staging_s, 1), "expected": expected, "steps": steps, "peak_rss_mb": rss,
            "others_cores": max(s["others_cores"] for s in steps.values()),
            "meets_targets": {"rss": rss <= TARGETS["rss_mb"], "commit": steps["commit"]["seconds"] <= TARGETS["commit_s"],
                              "resume": steps["resume"]["seconds"] <= TARGETS["resume_s"]}}


def table(results: list[dict]) -> str:
    lines = [f"{'N':>9} {'files':>7} | {'commit s':>9} {'MB':>6} | {'update s':>9} {'MB':>6} "
             f"{'CPU s':>6} | {'listing s':>9} {'MB':>6} | {'baseline MB':>11} | {'others':>6}"]
    for r in results:
        s = r["steps"]
        lines.append(f"{r['n']:>9} {r['staged_files']:>7} | {s['commit']['seconds']:>9.2f} {s['commit']['rss_mb']:>6.0f} | "
                     f"{s['resume']['seconds']:>9.2f} {s['resume']['rss_mb']:>6.0f} {s['resume']['cpu_s']:>6.1f} | "
                     f"{s['listing']['seconds']:>9.2f} {s['listing']['rss_mb']:>6.0f} | {s['baseline']['rss_mb']:>11.0f} | "
                     f"{r['others_cores']:>6.2f}")
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
    info = harness.header()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="batchdet-scale-"))
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(measure_size(n, args.rows_per_file, workdir))
            print(table(results[-1:]).splitlines()[-1] if len(results) > 1 else table(results), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {**info, "targets": TARGETS, "results": results}
    if args.json_out:
        harness.write_json(Path(args.json_out), report)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

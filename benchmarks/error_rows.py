"""A whole ``detect`` of N error rows: does the pipeline's rate hold as runs grow? (issue 16, item 3)

Each run reads an N-line manifest of files that do not exist, so every image
becomes an error row: what is measured is batchdet's own machinery (listing,
blocks, read tasks, the actors' error path, staging, commit), not a model. The
near-free model (harness.near_free_model) is loaded by the actors as usual.
Each size runs in a fresh process with its own local Ray; it records

- ``wall_s``: the whole ``detect`` call, Ray's start included;
- ``rows_per_s``: the steady rate the progress line shows (first finished
  block to the last: start-up left out), and ``whole_rows_per_s`` = N / wall;
- ``rows_per_s_by_fifth``: the rate over each fifth of the rows, in order: a
  cost that grows with the run shows as a falling rate within one run, free
  of the drift between runs;
- ``driver_rss_mb``: the driver process's peak resident memory (VmHWM);
- the committed counts, checked against N (every row an error, none lost).

    python benchmarks/error_rows.py --sizes 10000,100000 --json error_rows.json

Target: ``rows_per_s`` at the largest size >= 0.9 x at the smallest.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import harness
from harness import header, parser, print_rows

#: the rate at the largest size over that at the smallest, at least
TARGET_RATE_RATIO = 0.9


def by_fifth(points: list[tuple[float, int]], total: int) -> list[float]:
    """Rows/s over each fifth of ``total`` rows, from (seconds, rows done)
    polls: each fifth from the first poll at or past its start to the first
    at or past its end."""
    def reached(rows: float) -> tuple[float, int]:
        return next((t, d) for t, d in points if d >= rows)

    rates = []
    for k in range(5):
        (t0, d0), (t1, d1) = reached(max(1, total * k / 5)), reached(total * (k + 1) / 5)
        rates.append(round((d1 - d0) / (t1 - t0), 1) if t1 > t0 else float("nan"))
    return rates


def run_size(n: int, model: Path, workdir: Path) -> dict:
    """``detect`` over an ``n``-line manifest of missing files, in a fresh process (harness.run_detect)."""
    manifest = workdir / f"missing-{n}.txt"
    manifest.write_text("".join(f"/nonexistent/batchdet-bench/{i // 1000:04d}/img{i:07d}.jpg\n" for i in range(n)))
    output = workdir / f"out-{n}"
    record = harness.run_detect({"missing": str(manifest)}, output, workdir / f"run-{n}.json",
                                {"model": str(model), "stall_timeout": 0})
    shutil.rmtree(output)
    return size_figures(n, record)


def size_figures(n: int, record: dict) -> dict:
    """One size's figures from the child's record; checks every one of the ``n`` rows came back an error row."""
    counts = record["datasets"]["missing"]
    if counts["images"] != n or counts["images_error"] != n:
        raise SystemExit(f"{n} missing files gave {counts['images']} rows, {counts['images_error']} errors")
    polls = record["progress"]
    return {"n": n, "wall_s": round(record["wall_s"], 2), "whole_rows_per_s": round(n / record["wall_s"], 1),
            "rows_per_s": round(harness.progress_figures(polls, record["wall_s"])["steady_images_per_s"] or 0.0, 1),
            "rows_per_s_by_fifth": by_fifth([(t, done) for t, done, _ in polls], n),
            "driver_rss_mb": round(record["driver_rss_mb"]), "images": counts["images"],
            "images_error": counts["images_error"], "files": record["files"]}


def rate_ratio(results: list[dict]) -> dict:
    """The steady rate at the largest size over that at the smallest, and whether it meets the target."""
    ratio = results[-1]["rows_per_s"] / results[0]["rows_per_s"] if results[0]["rows_per_s"] else None
    return {"rate_ratio_largest_to_smallest": ratio, "target_rate_ratio": TARGET_RATE_RATIO,
            "meets_target": ratio is not None and ratio >= TARGET_RATE_RATIO}


def table(results: list[dict]) -> str:
    lines = [f"{'rows':>8} | {'wall s':>7} {'rows/s whole':>12} {'rows/s steady':>13} {'rows/s by fifth':>30} | "
             f"{'driver MB':>9} {'files':>6}"]
    for r in results:
        fifths = " ".join(f"{v:.0f}" for v in r["rows_per_s_by_fifth"])
        lines.append(f"{r['n']:>8} | {r['wall_s']:>7.1f} {r['whole_rows_per_s']:>12.0f} {r['rows_per_s']:>13.0f} "
                     f"{fifths:>30} | {r['driver_rss_mb']:>9} {r['files']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "10000,100000", "error rows").parse_args(argv)
    info = header()
    workdir = Path(tempfile.mkdtemp(prefix="batchdet-error-rows-"))
    try:
        model = harness.near_free_model(workdir / "nearfree.onnx")
        results = print_rows(table, (run_size(int(n), model, workdir) for n in args.sizes.split(",")))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {**info, "results": results, **rate_ratio(results)}
    if args.json_out:
        harness.write_json(Path(args.json_out), report)
    ratio = report["rate_ratio_largest_to_smallest"]
    print(f"\nsteady rows/s, largest over smallest: {ratio:.2f} (target >= {TARGET_RATE_RATIO})" if ratio else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

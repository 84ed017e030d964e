#!/usr/bin/env python
"""batchdet's pipeline against the hardware: how close ``detect`` gets to bare onnxruntime.

One run, the same synthesized 640×480 JPEGs and the same model throughout:

  bare       onnxruntime alone, looping over ready float32 inputs with the
             session settings batchdet uses (the ceiling), measured in three
             segments interleaved with the pipeline runs so that both see the
             same background load;
  pipeline   ``batchdet.api.detect`` end to end (embedded Ray, fresh process
             each), at two dataset sizes: images/s end to end and in steady
             state (batchdet's own progress rate, first finished block to
             the last: the throughput target, since start-up is a fixed cost
             per run), each as a ratio to the ceiling, the marginal rate
             between the two sizes (fixed start-up cancels), peak memory of
             the whole process tree (driver, GCS, raylet with the object
             store, workers; sum of PSS, so shared pages count once) and
             bytes per image crossing the object store (the files the read
             tasks hand to the actors: the sum of the files' sizes).

Preprocessing against a bare decode is ``preprocessing.py``; INT8 against
FP32 is ``int8.py``. Every target is a ratio within this run, never absolute
seconds: the machine is shared, and ``foreign_cpu_cores`` in each phase says
how busy it was.

    python benchmarks/bench.py --images 20,80 --out bench-out/results.json
    python benchmarks/bench.py --quick --out bench-out/quick.json      # CI smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import harness

#: Targets of the performance issue (ratios measured within one run).
TARGETS = {
    "pipeline_vs_bare": (">=", 0.95),
    "memory_growth": ("<=", 0.10),
    "object_store_mb_per_image": ("<=", 4.5),
}


# --- the pipeline, in a child process ------------------------------------------------------
def run_pipeline(model: Path, folder: Path, images: int, workdir: Path, options: dict, interval: float) -> dict:
    """``detect`` over ``folder`` in a fresh process (harness.run_detect); its figures."""
    record = harness.run_detect({"bench": str(folder)}, workdir / f"output-{images}", workdir / f"pipeline-{images}.json",
                                {"model": str(model), **options}, interval)
    run = pipeline_figures(images, record, harness.folder_bytes(folder))
    print(f"  pipeline {images}: {run['images_per_s']:.4f} images/s, peak {run['peak_memory_bytes'] / 1e9:.2f} GB, "
          f"{run['object_store_bytes_per_image'] / 1e6:.2f} MB/image through the object store "
          f"(others used {run['foreign_cpu_cores']:.2f} cores)", flush=True)
    return run


def pipeline_figures(images: int, record: dict, files_bytes: int) -> dict:
    """A pipeline run's figures from the child's record (harness.run_detect)
    and the bytes of the files it read: those bytes are what the read tasks
    hand to the actors through the object store (a result row adds little)."""
    return {
        "images": images,
        "wall_s": record["wall_s"],
        "images_per_s": images / record["wall_s"],
        "cpu_s_per_image": record["cpu_s"] / images,
        "cpu_s_by_role": record["cpu_s_by_role"],
        "timeline": {"ray_start_s": record["ray_start_s"], **harness.progress_figures(record["progress"], record["wall_s"])},
        "process_wall_s": record["process_wall_s"],
        "peak_memory_bytes": record["peak_memory_bytes"],
        "peak_rss_sum_bytes": record["peak_rss_sum_bytes"],
        "peak_processes": record["peak_processes"],
        "peak_memory_by_role": record["peak_memory_by_role"],
        "memory_samples": record["memory_samples"],
        "object_store_bytes_per_image": files_bytes / images,
        "foreign_cpu_cores": record["others_cores"],
        "datasets": record["datasets"],
    }


def better_layout(one: dict, split: dict | None) -> dict:
    """A bare segment: the faster of one session with all threads and one
    1-thread session per CPU (the ceiling is the better layout), both kept."""
    best = max([one, split] if split else [one], key=lambda x: x["images_per_s"])
    return {**best, "layout": "split" if best is split else "one_session", "one_session": one, "split": split}


def summarize(segments: list[dict], runs: list[dict]) -> dict:
    """The run's figures from its bare segments (before, and after each
    pipeline run) and its two pipeline runs: the ceiling, each run against
    the bare segments either side of it, the marginal rate, memory growth and
    bytes through the object store. Adds the ratios to ``runs``."""
    rates = [s["images_per_s"] for s in segments]
    ceiling = statistics.fmean(rates)
    bare_cpu = statistics.fmean(s["cpu_s_per_image"] for s in segments)
    for i, run in enumerate(runs):
        adjacent = statistics.fmean(rates[i:i + 2])  # the bare segments just before and after this run
        steady = run["timeline"]["steady_images_per_s"]
        run.update(bare_images_per_s_adjacent=adjacent, ratio_to_bare=run["images_per_s"] / adjacent,
                   steady_ratio_to_bare=steady / adjacent if steady else None,
                   # load-robust view: the bare loop's CPU per image over the whole pipeline's (every process)
                   cpu_ratio_to_bare=bare_cpu / run["cpu_s_per_image"])
    small, large = runs
    rate = harness.marginal_rate(small, large)
    per_image = [r["object_store_bytes_per_image"] for r in runs]
    return {
        "bare": {"images_per_s": ceiling, "s_per_image": 1 / ceiling, "cpu_s_per_image": bare_cpu,
                 "segments": segments, "spread": (max(rates) - min(rates)) / ceiling,
                 "layouts_images_per_s": {k: statistics.fmean(s[k]["images_per_s"] for s in segments)
                                          for k in ("one_session", "split") if segments[0][k]}},
        "pipeline": runs,
        "pipeline_marginal": {"from": small["images"], "to": large["images"], "images_per_s": rate,
                              "ratio_to_bare": rate / ceiling} if rate else None,
        "memory": {"peak_bytes": {str(r["images"]): r["peak_memory_bytes"] for r in runs},
                   "from": small["images"], "to": large["images"],
                   "growth": harness.growth(small["peak_memory_bytes"], large["peak_memory_bytes"])},
        "object_store": {"bytes_per_image": max(per_image), "mb_per_image": max(per_image) / 1e6,
                         "by_run": {str(r["images"]): r["object_store_bytes_per_image"] for r in runs}},
    }


def target_inputs(res: dict) -> tuple[dict[str, float | None], dict[str, float]]:
    """Each target's value and the load it was measured under: the steady
    state of the larger run (start-up and the commit are per-run latency,
    reported beside it) with the bare segments around it, memory over both runs."""
    runs, seg_load = res["pipeline"], [s["foreign_cpu_cores"] for s in res["bare"]["segments"]]
    values = {"pipeline_vs_bare": runs[-1]["steady_ratio_to_bare"], "memory_growth": res["memory"]["growth"],
              "object_store_mb_per_image": res["object_store"]["mb_per_image"]}
    loads = {"pipeline_vs_bare": max(runs[-1]["foreign_cpu_cores"], *seg_load[-2:]),
             "memory_growth": max(r["foreign_cpu_cores"] for r in runs),
             "object_store_mb_per_image": 0.0}  # a count of bytes: load does not change it
    return values, loads


# --- report ----------------------------------------------------------------------------------
def rows(res: dict) -> list[tuple[str, str, str]]:
    """The report's rows: the ceiling, each run, the marginal rate, memory, object store."""
    b, mem = res["bare"], res["memory"]
    rows = [("bare onnxruntime (ceiling)", f"{b['images_per_s']:.4f} img/s",
                 f"{b['s_per_image']:.3f} s/image, the better layout of {len(b['segments'])} segments; "
                 "others used " + "/".join(f"{x['foreign_cpu_cores']:.2f}" for x in b["segments"]) + " cores")]
    for name, rate in b.get("layouts_images_per_s", {}).items():
        rows.append((f"  bare, {name.replace('_', ' ')}", f"{rate:.4f} img/s",
                     "one session, all threads" if name == "one_session" else "one 1-thread session per CPU"))
    for run in res["pipeline"]:
        rows.append((f"pipeline, {run['images']} images", f"{run['images_per_s']:.4f} img/s",
                     f"{run['ratio_to_bare']:.3f} x bare (end to end, incl. Ray start); "
                     f"CPU/image {run['cpu_ratio_to_bare']:.3f} x bare's; others used "
                     f"{run['foreign_cpu_cores']:.2f} cores"))
        tl = run["timeline"]
        if tl["steady_images_per_s"]:
            rows.append((f"  {run['images']} images, steady state", f"{tl['steady_images_per_s']:.4f} img/s",
                         f"{run['steady_ratio_to_bare']:.3f} x bare (first finished block to the last: throughput "
                         "once running)"))
        if tl["first_done_s"] is not None:
            rows.append((f"  {run['images']} images: where the time went", f"{tl['first_done_s']:.1f} s to the first",
                         f"Ray's start {tl['ray_start_s']:.1f} s, then actors, model load and a first block; "
                         f"tail {tl['tail_s']:.1f} s from the last progress report to detect's return"))
    m = res["pipeline_marginal"]
    if m:
        rows.append((f"pipeline, marginal {m['from']}->{m['to']}", f"{m['images_per_s']:.4f} img/s",
                     f"{m['ratio_to_bare']:.3f} x bare (start-up cancelled)"))
    for n, peak in mem["peak_bytes"].items():
        rows.append((f"peak memory, {n} images", f"{peak / 1e9:.2f} GB", "sum of PSS over the process tree"))
    rows.append(("peak memory growth", f"{mem['growth'] * 100:+.1f} %", f"{mem['from']} -> {mem['to']} images"))
    rows.append(("object store per image", f"{res['object_store']['mb_per_image']:.2f} MB",
                 "the read files' bytes / images (what read tasks hand to actors)"))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="20,80", help="two dataset sizes for the pipeline runs (default 20,80)")
    p.add_argument("--bare-images", type=int, default=4, help="images per bare onnxruntime segment (3 segments)")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads of the bare one-session loop (default: CPUs, at most 4) and, "
                        "when given, of each pipeline actor (default: detect's own layout)")
    p.add_argument("--actors", metavar="MIN[:MAX]", help="the pipeline's inference actors (detect --actors)")
    p.add_argument("--batch-size", type=int, help="images per block (detect --batch-size; default: detect's own)")
    p.add_argument("--bare-nice", type=int, default=harness.RAY_WORKER_NICENESS,
                   help="niceness of the bare loops (default: Ray's worker niceness, 15)")
    p.add_argument("--sample-interval", type=float, default=5.0,
                   help="seconds between memory samples (one costs ~50 ms of CPU, taken from what is measured)")
    harness.add_common_args(p, "bench-out/results.json")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: narrow stand-in (divisor 16), 2 and 4 images, one actor, 1 bare image per segment")
    args = p.parse_args(argv)
    if args.quick:
        harness.quick_model(args)
        if args.images == "20,80":
            args.images = "2,4"
        args.actors = args.actors or "1"
        args.bare_images = 1
        args.sample_interval = min(args.sample_interval, 1.0)
    return args


def detect_options(args: argparse.Namespace) -> dict:
    """``detect``'s options the arguments ask for (its public ``DetectOptions``)."""
    options: dict = {}
    if args.threads:
        options["threads_per_actor"] = args.threads
    if args.actors:
        low, _, high = args.actors.partition(":")
        options["actors"] = [int(low), int(high or low)]
    if args.batch_size:
        options["batch_size"] = args.batch_size
    return options


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = sorted(int(n) for n in args.images.split(","))
    if len(sizes) != 2 or sizes[0] < 1:
        raise SystemExit("--images takes two sizes, e.g. 20,80")
    workdir, started, res = harness.begin(args)
    threads = harness.threads(args)
    model = harness.resolve_model(args, workdir)
    files = harness.synthesize(workdir / "images", sizes[-1])
    options = detect_options(args)
    res["config"] = {"detect_options": options, **harness.model_config(args, model), "images": sizes,
                     "image_size": [harness.WIDTH, harness.HEIGHT], "threads": threads, "quick": args.quick,
                     "command": harness.command(argv)}

    print("bare onnxruntime and pipeline, interleaved ...", flush=True)
    bare = harness.niced_executor(args.bare_nice)
    fp32 = bare.submit(harness.float_session, model, threads).result()
    inputs = harness.ready_inputs(files[:max(1, args.bare_images)])
    warm = bare.submit(harness.timed_runs, fp32, inputs[:1]).result()[0]
    # the same CPUs as single-thread sessions, one per CPU: the ceiling is the better layout
    cpus = os.cpu_count() or 1
    split_pool = harness.niced_executor(args.bare_nice, cpus)
    singles = [split_pool.submit(harness.float_session, model, 1).result() for _ in range(cpus)] if cpus > 1 else []

    def bare_both(label: str) -> dict:
        one = bare.submit(harness.bare_segment, fp32, inputs, label).result()
        return better_layout(one, harness.bare_split_segment(singles, inputs, label, split_pool) if singles else None)

    segments = [bare_both("before")]
    runs = []
    for n in sizes:
        folder = harness.dataset_folder(workdir, files, n)
        runs.append(run_pipeline(model, folder, n, workdir, options, args.sample_interval))
        segments.append(bare_both(f"after {n}"))
    split_pool.shutdown()
    bare.shutdown()
    res.update(summarize(segments, runs))
    res["bare"].update(warmup_s=warm, nice=args.bare_nice,
                       settings=f"batchdet.pipeline.inference.session_options on the float model, ready float32 "
                                f"inputs; per segment the better of one session x {threads} threads and "
                                f"{cpus} sessions x 1 thread")
    res["targets"] = harness.judge(TARGETS, *target_inputs(res))
    res["elapsed_s"] = time.time() - started
    harness.write_report(Path(args.out), res, rows(res))
    return res


if __name__ == "__main__":
    main()

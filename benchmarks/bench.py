#!/usr/bin/env python
"""batchdet's pipeline against the hardware: how close ``detect`` gets to bare onnxruntime.

One run, the same synthesized 640×480 JPEGs and the same model throughout:

  bare       onnxruntime alone, looping over ready float32 inputs with the
             session settings batchdet uses (the ceiling), measured in three
             segments interleaved with the pipeline runs so that both see the
             same background load;
  pipeline   ``batchdet.api.detect`` end to end (embedded Ray, fresh process
             each), at two dataset sizes: images/s end to end and in steady
             state (first result to last: the throughput target, since
             start-up is a fixed cost per run), each as a ratio to the
             ceiling, the marginal rate between the two sizes (fixed
             start-up cancels),
             peak memory of the whole process tree (driver, GCS, raylet with
             the object store, workers; sum of PSS, so shared pages count
             once) and bytes per image crossing the object store (Ray Data's
             per-operator output sizes, from ``Dataset.stats()``).

Preprocessing against a bare decode is ``preprocessing.py``; INT8 against
FP32 is ``int8.py``. Every target is a ratio within this run, never absolute
seconds: the machine is shared, and ``foreign_cpu_cores`` in each phase says
how busy it was.

    python benchmarks/bench.py --images 20,80 --out bench-out/results.json
    python benchmarks/bench.py --quick --out bench-out/quick.json      # CI smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import measure
from harness import header

#: Targets of the performance issue (ratios measured within one run).
TARGETS = {
    "pipeline_vs_bare": (">=", 0.95),
    "memory_growth": ("<=", 0.10),
    "object_store_mb_per_image": ("<=", 4.5),
}


# --- the pipeline, in a child process ------------------------------------------------------
def _timer_hook(log_dir: str):
    """A Ray ``worker_process_setup_hook`` recording, in every worker, when
    OnnxBackend.load and OnnxBackend.predict ran (wall-clock, comparable across
    processes): a line per call, appended to ``log_dir/calls-<pid>.txt``. It
    adds two clock reads and one short write per image to what is measured."""

    def hook() -> None:
        import os
        import time as _time

        from batchdet.pipeline import inference

        path = os.path.join(log_dir, f"calls-{os.getpid()}.txt")

        def timed(name, fn):
            def wrapper(self, *a, **kw):
                t0 = _time.time()
                try:
                    return fn(self, *a, **kw)
                finally:
                    with open(path, "a") as f:
                        f.write(f"{name} {t0:.6f} {_time.time():.6f}\n")
            return wrapper

        inference.OnnxBackend.load = timed("load", inference.OnnxBackend.load)
        inference.OnnxBackend.predict = timed("predict", inference.OnnxBackend.predict)

    return hook


def _read_calls(log_dir: Path) -> dict[str, list[tuple[float, float]]]:
    calls: dict[str, list[tuple[float, float]]] = {"load": [], "predict": []}
    for f in log_dir.glob("calls-*.txt"):
        for line in f.read_text().splitlines():
            name, t0, t1 = line.split()
            calls.setdefault(name, []).append((float(t0), float(t1)))
    for v in calls.values():
        v.sort()
    return calls


#: --experiment KEY=VALUE: proposed pipeline changes, applied inside the
#: pipeline's driver process, so their effect can be measured before anyone
#: edits batchdet/pipeline/run.py. Not used by default.
EXPERIMENTS = {
    "max_block": "batchdet.pipeline.run.MAX_BLOCK = int(VALUE): most images in a block",
    "object_store_limit": "DataContext.execution_options.resource_limits.object_store_memory = VALUE bytes",
    "downstream_ratio": "DataContext.downstream_capacity_backpressure_ratio = VALUE",
    "downstream_threshold": "RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD = VALUE "
                            "(budget use above which the downstream-capacity backpressure applies; Ray's default 0.5)",
}


def apply_experiments(experiments: list[str]) -> None:
    for item in experiments or []:
        key, _, value = item.partition("=")
        if key not in EXPERIMENTS:
            raise SystemExit(f"unknown --experiment {key!r}; known: {', '.join(EXPERIMENTS)}")
        if key == "downstream_threshold":  # read when Ray Data's policy module is imported
            os.environ["RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD"] = value
            continue
        import ray.data

        ctx = ray.data.DataContext.get_current()
        if key == "max_block":
            import batchdet.pipeline.run

            batchdet.pipeline.run.MAX_BLOCK = int(value)
        elif key == "object_store_limit":
            ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
                object_store_memory=float(value))
        elif key == "downstream_ratio":
            ctx.downstream_capacity_backpressure_ratio = float(value)


def pipeline_child(args: argparse.Namespace) -> None:
    """Entry of the child process: run detect(), report timings and Ray Data stats as JSON."""
    for item in args.experiment or []:  # environment ones first: read when Ray Data is imported
        if item.startswith("downstream_threshold="):
            apply_experiments([item])
    import ray
    import ray.data

    captured = {}
    original = ray.data.Dataset.write_datasink

    def write_datasink(self, *a, **kw):  # the pipeline's last call: keep its dataset for its stats()
        captured["ds"] = self
        return original(self, *a, **kw)

    ray.data.Dataset.write_datasink = write_datasink
    from batchdet.api import detect
    from batchdet.pipeline.run import local_ray_options

    t = time.perf_counter()
    # What batchdet.pipeline.run.ray_session does (an embedded Ray of its own), started
    # here to add the timing hook; detect() reuses this Ray. It is shut down
    # inside the timing, as ray_session does.
    apply_experiments(args.experiment)
    calls_dir = Path(args.child_result).with_suffix(".calls")
    shutil.rmtree(calls_dir, ignore_errors=True)
    calls_dir.mkdir(parents=True)
    started_epoch = time.time()
    ray.init(**local_ray_options(),
             runtime_env={"worker_process_setup_hook": _timer_hook(str(calls_dir))})
    try:
        actors = tuple(int(a) for a in args.actors.split(":")) if args.actors else None
        if actors and len(actors) == 1:
            actors = (actors[0], actors[0])
        result = detect({"bench": args.child_images}, args.child_output, model=args.child_model,
                        threads_per_actor=args.threads or None, actors=actors)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t
    ended_epoch = time.time()
    ds = captured.get("ds")
    operators = operator_stats(ds.stats()) if ds is not None else []
    counts = {name: c.__dict__ if hasattr(c, "__dict__") else str(c) for name, c in result.datasets.items()}
    Path(args.child_result).write_text(json.dumps({
        "detect_wall_s": wall, "manifest_wall_s": result.wall_s, "manifest_images_per_s": result.images_per_s,
        "datasets": counts, "operators": operators,
        "started_epoch": started_epoch, "ended_epoch": ended_epoch, "calls_dir": str(calls_dir),
    }, default=str))


#: Lines of ``Dataset.stats()``: an operator's name, then its figures.
_OPERATOR = re.compile(r"^\s*(?:Operator|Suboperator) \d+ (?P<name>.+?): (?!executed in)")
_FIGURE = re.compile(r"^\s*\* (?P<what>Remote wall time|Output num rows per block|Output size bytes per block): "
                     r".* (?P<total>[\d.]+)(?P<unit>us|ms|s)? total$")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}


def operator_stats(text: str) -> list[dict]:
    """Each operator's output rows, output bytes and remote wall time (totals)
    from the text of ``Dataset.stats()``, Ray Data's public account of a run."""
    operators: list[dict] = []
    for line in text.splitlines():
        if m := _OPERATOR.match(line):
            operators.append({"name": m["name"], "rows": None, "bytes": None, "wall_s": None})
        elif operators and (m := _FIGURE.match(line)):
            total = float(m["total"])
            key = {"Remote wall time": "wall_s", "Output num rows per block": "rows",
                   "Output size bytes per block": "bytes"}[m["what"]]
            operators[-1][key] = total * _UNIT_S[m["unit"]] if key == "wall_s" else int(total)
    return operators


def run_pipeline(model: Path, folder: Path, images: int, workdir: Path, threads: int, interval: float,
                 experiments: list[str] | None = None, actors: str | None = None) -> dict:
    out = workdir / f"output-{images}"
    shutil.rmtree(out, ignore_errors=True)
    result_file = workdir / f"pipeline-{images}.json"
    log = workdir / f"pipeline-{images}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-pipeline", "--child-model", str(model),
           "--child-images", str(folder), "--child-output", str(out), "--child-result", str(result_file),
           "--threads", str(threads)]
    for item in experiments or []:
        cmd += ["--experiment", item]
    if actors:
        cmd += ["--actors", actors]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        sampler = measure.TreeSampler(proc.pid, interval)
        with measure.Phase(sampler.cpu_seconds) as ph:
            sampler.start()
            code = proc.wait()
            sampler.stop()
    if code != 0:
        raise SystemExit(f"pipeline run over {images} images failed (exit {code}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    child = json.loads(result_file.read_text())
    # every block an operator outputs is put in the object store (the fused
    # read→prepare task keeps the JPEG bytes to itself)
    store_bytes = sum(o["bytes"] for o in child["operators"] if o.get("bytes"))
    calls = _read_calls(Path(child["calls_dir"]))
    predicts, loads = calls["predict"], calls["load"]
    timeline = None
    if predicts:
        busy = sum(t1 - t0 for t0, t1 in predicts)
        ends = sorted(t1 for _, t1 in predicts)
        span = ends[-1] - predicts[0][0]
        actors = max(1, len(loads))  # each actor loads the model once
        timeline = {
            "predicts": len(predicts),
            "actors": actors,
            "startup_s": predicts[0][0] - child["started_epoch"],  # Ray start, actor, model load, first block
            "model_load_s": max((t1 - t0 for t0, t1 in loads), default=0.0),  # the slowest actor's (loads overlap)
            "predict_s_per_image": busy / len(predicts),  # normalisation + model, in one actor
            # share of the actors' time inside predict between the first and the last image
            "steady_busy_fraction": busy / (span * actors) if span > 0 else 1.0,
            # the rate once running: results after the first, over the time from the first to the last
            "steady_images_per_s": (len(predicts) - 1) / (ends[-1] - ends[0]) if ends[-1] > ends[0] else None,
            "tail_s": child["ended_epoch"] - ends[-1],  # last result (of any actor) → output committed, Ray down
        }
    cpu = sampler.cpu_seconds()
    run = {
        "images": images,
        "wall_s": child["detect_wall_s"],
        "cpu_s_per_image": cpu / images,
        "timeline": timeline,
        "images_per_s": images / child["detect_wall_s"],
        "manifest_images_per_s": child["manifest_images_per_s"],
        "process_wall_s": ph.wall,
        "peak_memory_bytes": sampler.peak_pss,
        "peak_rss_sum_bytes": sampler.peak_rss,
        "peak_processes": sampler.peak_processes,
        "peak_memory_by_process": sampler.peak_by_process,
        "memory_samples": sampler.samples,
        "object_store_bytes_per_image": store_bytes / images,
        "operators": child["operators"],
        "foreign_cpu_cores": ph.foreign_cores,
        "datasets": child["datasets"],
    }
    print(f"  pipeline {images}: {run['images_per_s']:.4f} images/s, peak {run['peak_memory_bytes'] / 1e9:.2f} GB, "
          f"{run['object_store_bytes_per_image'] / 1e6:.2f} MB/image through the object store "
          f"(others used {ph.foreign_cores:.2f} cores)", flush=True)
    return run


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
        tl = run.get("timeline")
        if tl:
            if tl.get("steady_images_per_s"):
                rows.append((f"  {run['images']} images, steady state", f"{tl['steady_images_per_s']:.4f} img/s",
                             f"{run['steady_ratio_to_bare']:.3f} x bare (first result to last: throughput once "
                             "running)"))
            rows.append((f"  {run['images']} images: where the time went",
                         f"{tl['predict_s_per_image']:.3f} s/predict" + (f" x {tl['actors']}" if tl["actors"] > 1 else ""),
                         f"start-up {tl['startup_s']:.1f} s (model load {tl['model_load_s']:.2f} s), "
                         f"actors busy {tl['steady_busy_fraction'] * 100:.1f} % between first and last image, "
                         f"tail {tl['tail_s']:.1f} s"))
    m = res["pipeline_marginal"]
    if m:
        rows.append((f"pipeline, marginal {m['from']}->{m['to']}", f"{m['images_per_s']:.4f} img/s",
                     f"{m['ratio_to_bare']:.3f} x bare (start-up cancelled)"))
    for n, peak in mem["peak_bytes"].items():
        rows.append((f"peak memory, {n} images", f"{peak / 1e9:.2f} GB", "sum of PSS over the process tree"))
    rows.append(("peak memory growth", f"{mem['growth'] * 100:+.1f} %", f"{mem['from']} -> {mem['to']} images"))
    rows.append(("object store per image", f"{res['object_store']['mb_per_image']:.2f} MB",
                 "sum of Ray Data operator outputs / images"))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="20,80", help="two dataset sizes for the pipeline runs (default 20,80)")
    p.add_argument("--bare-images", type=int, default=4, help="images per bare onnxruntime segment (3 segments)")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads of the bare one-session loop (default: CPUs, at most 4) and, "
                        "when given, of each pipeline actor (default: detect's own layout)")
    p.add_argument("--actors", metavar="MIN[:MAX]", help="the pipeline's inference actors (detect --actors)")
    p.add_argument("--experiment", action="append", default=[], metavar="KEY=VALUE",
                   help="apply a proposed pipeline change inside the pipeline runs (repeatable): "
                        + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    p.add_argument("--bare-nice", type=int, default=measure.RAY_WORKER_NICENESS,
                   help="niceness of the bare loops (default: Ray's worker niceness, 15)")
    p.add_argument("--sample-interval", type=float, default=5.0,
                   help="seconds between memory samples (one costs ~50 ms of CPU, taken from what is measured)")
    measure.add_common_args(p, "bench-out/results.json")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: narrow stand-in (divisor 16), 3 and 6 images, 1 bare image per segment")
    # internal: the pipeline child process
    for flag in ("--child-model", "--child-images", "--child-output", "--child-result"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--child-pipeline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        if args.channels_divisor == 1 and not args.model:
            args.channels_divisor = 16
        if args.images == "20,80":
            args.images = "3,6"
        args.bare_images = 1
        args.sample_interval = min(args.sample_interval, 0.25)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child_pipeline:
        pipeline_child(args)
        return None
    sizes = sorted(int(n) for n in args.images.split(","))
    if len(sizes) != 2 or sizes[0] < 1:
        raise SystemExit("--images takes two sizes, e.g. 20,80")
    workdir = measure.workdir(args)
    threads = measure.threads(args)
    started = time.time()

    res: dict = header()
    model = measure.resolve_model(args, workdir)
    files = measure.synthesize(workdir / "images", sizes[-1])
    res["config"] = {"experiments": args.experiment, "actors": args.actors, **measure.model_config(args, model),
                     "images": sizes, "image_size": [measure.WIDTH, measure.HEIGHT], "threads": threads, "quick": args.quick,
                     "command": measure.command(argv)}

    print("bare onnxruntime and pipeline, interleaved ...", flush=True)
    bare = measure.niced_executor(args.bare_nice)
    fp32 = bare.submit(measure.float_session, model, threads).result()
    n_bare = max(1, args.bare_images)
    inputs = measure.ready_inputs(files[:n_bare])
    warm = bare.submit(measure.timed_runs, fp32, inputs[:1]).result()[0]
    # the same CPUs as single-thread sessions, one per CPU: the ceiling is the better layout
    cpus = os.cpu_count() or 1
    split_pool = measure.niced_executor(args.bare_nice, cpus)
    singles = [split_pool.submit(measure.float_session, model, 1).result() for _ in range(cpus)] if cpus > 1 else []

    def bare_both(label: str) -> dict:
        one = bare.submit(measure.bare_segment, fp32, inputs[:n_bare], label).result()
        split = measure.bare_split_segment(singles, inputs[:n_bare], label, split_pool) if singles else None
        best = max([one, split] if split else [one], key=lambda x: x["images_per_s"])
        return {**best, "layout": "split" if best is split else "one_session", "one_session": one, "split": split}

    segments = [bare_both("before")]
    runs = []
    for i, n in enumerate(sizes):
        folder = measure.dataset_folder(workdir, files, n)
        runs.append(run_pipeline(model, folder, n, workdir, args.threads, args.sample_interval, args.experiment,
                                 args.actors))
        segments.append(bare_both(f"after {n}"))
    split_pool.shutdown()
    singles.clear()
    rates = [s["images_per_s"] for s in segments]
    ceiling = statistics.fmean(rates)
    bare_cpu = statistics.fmean(s["cpu_s_per_image"] for s in segments)
    for i, run in enumerate(runs):
        adjacent = statistics.fmean(rates[i:i + 2])  # the bare segments just before and after this run
        run["bare_images_per_s_adjacent"] = adjacent
        run["ratio_to_bare"] = run["images_per_s"] / adjacent
        steady = (run["timeline"] or {}).get("steady_images_per_s")
        run["steady_ratio_to_bare"] = steady / adjacent if steady else None
        # load-robust view: CPU seconds the bare loop spends per image over what the whole
        # pipeline (every process of it) spends per image
        run["cpu_ratio_to_bare"] = bare_cpu / run["cpu_s_per_image"]
    layouts = {k: statistics.fmean(s[k]["images_per_s"] for s in segments) for k in ("one_session", "split")
               if segments[0][k]}
    res["bare"] = {"images_per_s": ceiling, "s_per_image": 1 / ceiling, "cpu_s_per_image": bare_cpu,
                   "warmup_s": warm, "segments": segments, "layouts_images_per_s": layouts,
                   "settings": f"batchdet.pipeline.inference.session_options on the float model, ready float32 inputs; "
                               f"per segment the better of one session x {threads} threads and "
                               f"{cpus} sessions x 1 thread",
                   "nice": args.bare_nice,
                   "spread": (max(rates) - min(rates)) / ceiling}
    res["pipeline"] = runs
    (a, b) = runs
    extra = b["wall_s"] - a["wall_s"]
    marginal = (b["images"] - a["images"]) / extra if extra > 0 else None
    res["pipeline_marginal"] = {"from": a["images"], "to": b["images"], "images_per_s": marginal,
                                "ratio_to_bare": marginal / ceiling if marginal else None} if marginal else None
    res["memory"] = {"peak_bytes": {str(r["images"]): r["peak_memory_bytes"] for r in runs},
                     "from": a["images"], "to": b["images"],
                     "growth": b["peak_memory_bytes"] / a["peak_memory_bytes"] - 1}
    per_image = [r["object_store_bytes_per_image"] for r in runs]
    res["object_store"] = {"bytes_per_image": max(per_image), "mb_per_image": max(per_image) / 1e6,
                           "by_run": {str(r["images"]): r["object_store_bytes_per_image"] for r in runs}}
    bare.shutdown()

    seg_load = [x["foreign_cpu_cores"] for x in segments]
    loads = {
        "pipeline_vs_bare": max(runs[-1]["foreign_cpu_cores"], *seg_load[-2:]),
        "memory_growth": max(r["foreign_cpu_cores"] for r in runs),
        "object_store_mb_per_image": 0.0,  # a count of bytes: load does not change it
    }
    values = {
        # throughput once running: start-up (Ray, actor, model load, ~12 s
        # here) and the final commit are per-run latency, reported beside it
        "pipeline_vs_bare": runs[-1]["steady_ratio_to_bare"],
        "memory_growth": res["memory"]["growth"],
        "object_store_mb_per_image": res["object_store"]["mb_per_image"],
    }
    res["targets"] = measure.judge(TARGETS, values, loads)
    res["elapsed_s"] = time.time() - started
    measure.write_report(Path(args.out), res, rows(res))
    return res


if __name__ == "__main__":
    main()

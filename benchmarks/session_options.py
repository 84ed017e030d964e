#!/usr/bin/env python
"""Side-by-side measurement of onnxruntime session settings for batchdet.

Every variant is a session over the same model as given, fed the normalised
float32 input (what the CPU actors run), created up front; then rounds run one image
through each variant in turn, so that background load hits all of them
alike. Reported per variant: time per image relative to the default
settings (``batchdet.pipeline.inference.session_options``), and the resident memory
its creation and first run added. Then session creation: uncached (what
OnnxBackend did before the cache), a cache miss (optimise and store) and a
cache hit (load the stored optimized graph), interleaved as well.

    python benchmarks/session_options.py --rounds 3 --out bench-out/session_options.json
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (same folder: image synthesis, model resolution, Phase)

#: name → session_options() keyword arguments (threads given separately)
VARIANTS = {
    "default": {},
    "default again (noise gauge)": {},
    "spinning off": {"spinning": False},
    "spinning on": {"spinning": True},
    "level extended (no NCHWc)": {"level": "extended"},
    "level basic": {"level": "basic"},
    "arena off": {"arena": False},
    "mem pattern off": {"mem_pattern": False},
    "1 thread": {"threads": 1},
}
#: what a run without --variants measures ("spinning on"/"level basic" only when asked)
DEFAULT_SET = ["default", "default again (noise gauge)", "spinning off", "level extended (no NCHWc)",
               "arena off", "mem pattern off", "1 thread"]


def relative_figures(variant: dict, default: dict) -> dict:
    """A variant's mean time and CPU per image, and its time and CPU relative
    to the default's: per round, its time over the default's in the same
    round (both saw the same load), the median of those and their range."""
    ratios = [t / b for t, b in zip(variant["times"], default["times"])]
    return {"s_per_image": statistics.fmean(variant["times"]), "cpu_s_per_image": statistics.fmean(variant["cpu"]),
            "relative_time": statistics.median(ratios), "relative_time_range": [min(ratios), max(ratios)],
            "relative_cpu": statistics.median(t / b for t, b in zip(variant["cpu"], default["cpu"]))}


def creation_figures(creation: dict[str, list[float]]) -> dict:
    """Each way of creating a session: its times, mean and fastest; and a
    cache hit's mean over an uncached creation's."""
    res: dict = {m: {"times": v, "mean_s": statistics.fmean(v), "min_s": min(v)} for m, v in creation.items()}
    res["hit_vs_uncached"] = res["cache hit"]["mean_s"] / res["uncached"]["mean_s"]
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(p)
    p.add_argument("--rounds", type=int, default=3, help="images per variant after the warm-up")
    p.add_argument("--creation-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--out", default="bench-out/session_options.json")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from batchdet.model.spec import INPUT_NAME
    from batchdet.pipeline.inference import OnnxBackend, session_options
    from batchdet.pipeline.preprocess import preprocess

    threads = args.threads or min(os.cpu_count() or 1, 4)
    out = Path(args.out)
    work = out.parent / "work"
    model = harness.resolve_model(args, work)
    files = harness.synthesize(work / "images", max(args.rounds, 1))
    images = [preprocess(f.read_bytes())[0] for f in files]
    model_bytes = model.read_bytes()
    chosen = args.variants.split(",") if args.variants else DEFAULT_SET
    if "default" not in chosen:
        chosen.insert(0, "default")
    res: dict = {"machine": harness.machine_info(), "model": str(model), "threads": threads, "variants": {}}

    sessions = {}
    for name in chosen:
        kw = dict(VARIANTS[name])
        n = kw.pop("threads", threads)
        gc.collect()
        before = harness.rss_bytes()
        t = time.perf_counter()
        s = ort.InferenceSession(model_bytes, session_options(n, **kw), providers=["CPUExecutionProvider"])
        created = time.perf_counter() - t
        t = time.perf_counter()
        s.run(None, {INPUT_NAME: images[0]})  # warm-up: arena and pattern allocations happen here
        first = time.perf_counter() - t
        sessions[name] = s
        res["variants"][name] = {"options": VARIANTS[name], "create_s": created, "first_run_s": first,
                                 "rss_added_bytes": harness.rss_bytes() - before, "times": [], "cpu": []}
        print(f"{name}: created in {created:.2f} s, first run {first:.2f} s, "
              f"+{(harness.rss_bytes() - before) / 1e6:.0f} MB", flush=True)

    with harness.Phase(harness.own_cpu) as ph:
        for r in range(args.rounds):
            order = chosen if r % 2 == 0 else chosen[::-1]  # alternate the order: no variant always follows another
            for name in order:
                t, c = time.perf_counter(), time.process_time()
                sessions[name].run(None, {INPUT_NAME: images[r % len(images)]})
                res["variants"][name]["times"].append(time.perf_counter() - t)
                res["variants"][name]["cpu"].append(time.process_time() - c)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    res["foreign_cpu_cores"] = ph.foreign_cores
    base = res["variants"]["default"]
    for v in res["variants"].values():
        v.update(relative_figures(v, base))
    sessions.clear()
    gc.collect()

    # session creation: uncached vs cache miss vs cache hit (OnnxBackend.load, end to end)
    cache = Path(tempfile.mkdtemp(prefix="batchdet-ortcache-"))
    creation = {"uncached": [], "cache miss": [], "cache hit": []}
    saved = os.environ.get("BATCHDET_ORT_CACHE")
    try:
        for _ in range(args.creation_rounds):
            for mode in creation:
                if mode == "uncached":
                    os.environ["BATCHDET_ORT_CACHE"] = "0"
                else:
                    os.environ["BATCHDET_ORT_CACHE"] = str(cache)
                    if mode == "cache miss":
                        shutil.rmtree(cache, ignore_errors=True)
                t = time.perf_counter()
                backend = OnnxBackend(model, threads).load()
                creation[mode].append(time.perf_counter() - t)
                assert backend.load_source == {"uncached": "uncached", "cache miss": "cache-miss",
                                               "cache hit": "cache-hit"}[mode], backend.load_source
                del backend
                gc.collect()
    finally:
        if saved is None:
            os.environ.pop("BATCHDET_ORT_CACHE", None)
        else:
            os.environ["BATCHDET_ORT_CACHE"] = saved
        shutil.rmtree(cache, ignore_errors=True)
    res["creation"] = creation_figures(creation)
    harness.write_json(out, res)
    print(f"\nrun time per image relative to the defaults ({threads} threads; others used "
          f"{res['foreign_cpu_cores']:.2f} cores meanwhile):")
    print(f"  {'variant':28s} {'s/image':>8s}  {'time (median of per-round ratios) [range]':42s} {'CPU s/image':>11s}  "
          f"{'memory':>8s}")
    for name, v in res["variants"].items():
        lo, hi = v["relative_time_range"]
        print(f"  {name:28s} {v['s_per_image']:8.3f}  x{v['relative_time']:.3f} [{lo:.2f}-{hi:.2f}]{'':26s} "
              f"{v['cpu_s_per_image']:8.2f} x{v['relative_cpu']:.2f}  +{v['rss_added_bytes'] / 1e6:4.0f} MB")
    print("session creation (OnnxBackend.load, incl. check_model):")
    for m in ("uncached", "cache miss", "cache hit"):
        c = res["creation"][m]
        print(f"  {m:12s} mean {c['mean_s']:.3f} s  min {c['min_s']:.3f} s")
    print(f"  cache hit / uncached: x{res['creation']['hit_vs_uncached']:.3f}")
    print(f"written: {out}")
    return res


if __name__ == "__main__":
    main()

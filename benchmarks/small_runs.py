#!/usr/bin/env python
"""Small runs: a whole ``batchdet detect`` process against a bare onnxruntime script.

For each model (the full stand-in, FP32, and its INT8 copy made by ``batchdet
model quantize``) and each size (1, 8, 24 images by default), three fresh
processes each round, one after the other so that they see the same load:

- **bare**: ``python`` running :func:`bare` — import onnxruntime, numpy and
  Pillow, one session with a thread per CPU, then per image: read, decode and
  resize (Pillow, bilinear to 1200×1200), normalise (numpy), ``session.run``.
  What a user would write instead of batchdet.
- **in-process**, **ray**: ``batchdet detect --execution in-process|ray`` into a
  new output, each to its summary and exit.

The figure is bare's wall time over batchdet's (1.0: as fast as the bare
script). Where batchdet's time goes comes from its run manifest's ``timings``
(:func:`breakdown`): imports (process start to the run's call), planning,
output preparation (lease, manifest record), engine start (Ray's), model load,
first result, the rest of the images, then commit, summary and exit.

    python benchmarks/small_runs.py --json bench-out/small_runs.json
    python benchmarks/small_runs.py --quick   # the narrow stand-in, 1 and 2 images: a smoke test
    python benchmarks/small_runs.py --channels-divisor 8 --sizes 64,256 --no-int8   # where Ray starts to pay
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import header, print_rows, synthesize

#: Targets of issue 23, each judged on the in-process path (what ``auto`` picks at these sizes).
TARGETS = {
    "1-image extra seconds over bare (fp32)": ("<=", 3.0),
    "24-image bare / batchdet (fp32)": (">=", 0.90),
    "24-image bare / batchdet (int8)": (">=", 0.80),
}
EXECUTIONS = ("in-process", "ray")


def bare(model: str, files: list[str]) -> None:
    """The bare script (run in a fresh process by ``--bare``)."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    for path in files:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB").resize((1200, 1200), Image.BILINEAR), np.float32)
        x = ((rgb.transpose(2, 0, 1) / 255.0 - mean) / std)[None].astype(np.float32)
        session.run(None, {name: x})


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(spawned, ended) epoch seconds of a process running ``argv``; its failure raises."""
    spawned = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    ended = time.time()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} … exited {proc.returncode}: {proc.stderr[-2000:]}")
    return spawned, ended


def breakdown(spawned: float, ended: float, timings: dict[str, float]) -> dict[str, float]:
    """Seconds of each step of a ``batchdet detect`` process from its
    manifest's ``timings`` (seconds since the run's call at ``start``, epoch),
    the process's spawn and exit times. Steps a run did not have are 0."""
    start = timings["start"]
    marks = [("planning", "planned"), ("preparing", "prepared"), ("engine start", "engine_up"),
             ("model load", "model_loaded"), ("first result", "first_result"), ("other images", "processed")]
    steps = {"imports": start - spawned}
    last = 0.0
    for step, mark in marks:
        at = timings.get(mark)
        steps[step] = 0.0 if at is None else at - last
        last = last if at is None else at
    steps["commit and exit"] = ended - (start + last)
    return {k: round(v, 3) for k, v in steps.items()}


def measure(model: Path, kind: str, images: int, folder: Path, workdir: Path, env: dict[str, str]) -> dict:
    """One round at one size: bare, then each execution path, fresh processes."""
    files = sorted(folder.iterdir())[:images]
    subset = harness.dataset_folder(workdir, files, images)
    with harness.Phase(harness.own_and_children_cpu) as phase:
        spawned, ended = timed([sys.executable, __file__, "--bare", str(model), *map(str, files)], env)
        result = {"model": kind, "images": images, "bare_s": round(ended - spawned, 3)}
        for execution in EXECUTIONS:
            output = Path(tempfile.mkdtemp(dir=workdir))
            spawned, ended = timed(["batchdet", "detect", "--dataset", f"d={subset}", "--output", str(output),
                                    "--model", str(model), "--execution", execution], env)
            (manifest,) = (output / "_runs").glob("*.json")
            record = json.loads(manifest.read_text())
            assert record["execution"] == execution, record["execution"]
            result[execution] = {"wall_s": round(ended - spawned, 3),
                                 "steps": breakdown(spawned, ended, record["timings"])}
    result["others_cores"] = round(phase.foreign_cores, 2)  # Ray's grandchildren not waited for count here too
    return result


def ratios(result: dict) -> dict[str, float]:
    """bare / batchdet per path, and batchdet's seconds over bare's."""
    out = {}
    for execution in EXECUTIONS:
        wall = result[execution]["wall_s"]
        out[f"{execution} ratio"] = round(result["bare_s"] / wall, 3)
        out[f"{execution} extra_s"] = round(wall - result["bare_s"], 3)
    return out


def judge(results: list[dict]) -> dict[str, dict]:
    """Each target of :data:`TARGETS` on the in-process path, by its worst
    round (None: that model and size not measured), with the most cores
    others used meanwhile."""
    where = {"1-image extra seconds over bare (fp32)": ("fp32", 1, "in-process extra_s"),
             "24-image bare / batchdet (fp32)": ("fp32", 24, "in-process ratio"),
             "24-image bare / batchdet (int8)": ("int8", 24, "in-process ratio")}
    values, loads = {}, {}
    for name, (kind, images, key) in where.items():
        rounds = [r for r in results if r["model"] == kind and r["images"] == images]
        found = [ratios(r)[key] for r in rounds]
        values[name] = None if not found else max(found) if key.endswith("extra_s") else min(found)
        loads[name] = max((r.get("others_cores", 0.0) for r in rounds), default=0.0)
    return harness.judge(TARGETS, values, loads)


def table(results: list[dict]) -> str:
    """One line per model, size and round: wall times, ratios, and where in-process and ray spend theirs."""
    lines = ["model images   bare s  in-proc s  ratio    ray s  ratio  others  in-process steps | ray steps (s)"]
    for r in results:
        q = ratios(r)
        steps = [" ".join(f"{v:.1f}" for v in r[e]["steps"].values()) for e in EXECUTIONS]
        lines.append(f"{r['model']:<5} {r['images']:>6} {r['bare_s']:>8.1f} {r['in-process']['wall_s']:>10.1f}"
                     f" {q['in-process ratio']:>6.2f} {r['ray']['wall_s']:>8.1f} {q['ray ratio']:>6.2f}"
                     f" {r.get('others_cores', 0.0):>7.2f}  {steps[0]} | {steps[1]}")
    return "\n".join(lines)


def models(workdir: Path, divisor: int, images: Path, int8: bool) -> dict[str, Path]:
    """The stand-in at channels / ``divisor`` and (``int8``) its quantized copy."""
    from batchdet.model.quantize import quantize_model
    from batchdet.model.standin import write_standin

    fp32 = workdir / f"standin-div{divisor}.onnx"
    if not fp32.exists():
        write_standin(fp32, seed=0, channels_divisor=divisor)
    found = {"fp32": fp32}
    if int8:
        found["int8"] = workdir / f"standin-div{divisor}-int8.onnx"
        if not found["int8"].exists():
            quantize_model(fp32, images, images=8, to=found["int8"])
    return found


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bare"]:
        bare(argv[1], argv[2:])
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,8,24", help="comma-separated numbers of images")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-int8", action="store_true", help="FP32 only")
    p.add_argument("--channels-divisor", type=int, default=1, help="the stand-in with channels / N (8: narrow)")
    p.add_argument("--quick", action="store_true", help="the narrow stand-in at 1 and 2 images, FP32 only")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_out", help="write the figures here")
    args = p.parse_args(argv)
    sizes = [1, 2] if args.quick else [int(n) for n in args.sizes.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="small-runs-"))
    folder = workdir / "images"
    synthesize(folder, max(sizes))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each detect on its own, as a user's
    res = {**header(), "sizes": sizes, "rounds": args.rounds}
    found = models(workdir, 8 if args.quick else args.channels_divisor, folder, not (args.quick or args.no_int8))
    res["results"] = print_rows(table, (measure(path, kind, n, folder, workdir, env)
                                        for _ in range(args.rounds) for kind, path in found.items() for n in sizes))
    res["targets"] = judge(res["results"])
    for name, t in res["targets"].items():
        verdict = "met" if t["met"] else "NOT met" if t["met"] is False else "-"
        noisy = "" if t["reliable"] else f" (noisy: others used {t['others_cores']:.2f} cores)"
        print(f"{name}: {t['value']} (target {t['target']}): {verdict}{noisy}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

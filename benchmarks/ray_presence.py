"""What an idle Ray on the same node costs onnxruntime: the pipeline's
practical ceiling.

The pipeline's actors share their node with Ray's own processes (GCS, raylet,
dashboard, agents, log monitor) and with idle workers (Ray Data's helper
actors, workers kept warm between blocks), each waking ~100 times a second.
This script runs the bare ceiling's loop (one single-threaded session per
CPU, at Ray's worker niceness, over ready inputs) alone and then beside an
embedded Ray started as batchdet starts it, with ``--idle-workers`` idle
actors and no work at all, alternately for ``--rounds`` rounds. The ratio is
the most a Ray pipeline on this node could reach against ``bench.py``'s
ceiling even if every other cost were zero.

    python benchmarks/ray_presence.py --out bench-out/ray_presence.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray

import harness
from batchdet.pipeline.run import local_ray_options

#: Ray Data's three helper actors (_StatsActor, _AutoscalingCoordinatorActor,
#: ActorLocationTracker) and the ~3 workers kept warm between blocks, as
#: counted by process title in an earlier bench.py (no longer: Ray does not document its titles).
PIPELINE_IDLE_WORKERS = 6


@ray.remote(num_cpus=0)
class Idle:
    """A worker process that only exists, as Ray Data's helpers and warm workers do between calls."""

    def ping(self) -> int:
        return 0


def beside_ray(rate, idle_workers: int, settle_s: float) -> float:
    """``rate()`` with an embedded Ray and ``idle_workers`` idle actors running."""
    ray.init(**local_ray_options(), log_to_driver=False)
    try:
        idle = [Idle.remote() for _ in range(idle_workers)]
        ray.get([a.ping.remote() for a in idle])
        time.sleep(settle_s)  # Ray's start-up work (prestarted workers, agents) out of the way
        return rate()
    finally:
        ray.shutdown()


def presence_figures(rounds: list[dict]) -> dict:
    """Each round's rate beside Ray over its rate alone, and the median and
    range of those ratios (rounds alternate, so each ratio is of like loads)."""
    rounds = [{**r, "ratio": r["beside_ray_images_per_s"] / r["alone_images_per_s"]} for r in rounds]
    ratios = [r["ratio"] for r in rounds]
    return {"rounds": rounds, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=3, help="images per session per measurement")
    p.add_argument("--idle-workers", type=int, default=PIPELINE_IDLE_WORKERS)
    harness.add_model_args(p)
    p.add_argument("--settle", type=float, default=3.0, help="seconds between Ray's start and the measurement")
    p.add_argument("--workdir", default="bench-out/work")
    p.add_argument("--out", default="bench-out/ray_presence.json")
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    model = harness.resolve_model(args, workdir)
    inputs = harness.ready_inputs(harness.synthesize(workdir / "images", args.images))
    cpus = os.cpu_count() or 1
    pool = harness.niced_executor(harness.RAY_WORKER_NICENESS, cpus)
    sessions = [pool.submit(harness.float_session, model, 1).result() for _ in range(cpus)]

    def bare_rate(label: str) -> float:
        return harness.bare_split_segment(sessions, inputs, label, pool)["images_per_s"]

    rounds = []
    for i in range(args.rounds):
        alone = bare_rate(f"round {i}, alone")
        beside = beside_ray(lambda: bare_rate(f"round {i}, beside Ray"), args.idle_workers, args.settle)
        rounds.append({"alone_images_per_s": alone, "beside_ray_images_per_s": beside})
        print(f"round {i}: alone {alone:.4f} img/s, beside an idle Ray with {args.idle_workers} idle workers "
              f"{beside:.4f} img/s = {beside / alone:.3f}", flush=True)
    pool.shutdown()
    res = {"model": str(model), "cpus": cpus, "idle_workers": args.idle_workers, **presence_figures(rounds)}
    print(f"\nbare loop beside an idle Ray: median {res['median_ratio']:.3f} x alone "
          f"({res['min_ratio']:.3f}-{res['max_ratio']:.3f} over {len(rounds)} rounds)")
    harness.write_json(Path(args.out), res)
    return res


if __name__ == "__main__":
    main()

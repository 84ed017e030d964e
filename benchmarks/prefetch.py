"""How far Ray Data reads ahead of inference, with and without batchdet's
object-store cap (``batchdet.pipeline.run.job_context``), at growing dataset sizes.

Reading a file takes milliseconds, inference up to seconds, so an uncapped job
reads files far faster than the actors take them and holds the difference
in the object store: memory that grows with the dataset. This script runs
the pipeline's data path with the pipeline's own block size and cap, the
producer making blocks of ``--kb``-sized files (random bytes: only the flow
is measured) and one actor consuming them at a fixed rate (sleeping, so that
it does not compete for CPU), and reports the most images read but not yet
consumed at any moment, and whether the actor waited.

    python benchmarks/prefetch.py --out bench-out/prefetch.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import harness
from batchdet.pipeline.run import IO_CPUS, images_per_block, job_context, object_store_cap, read_compute


def produce(batch: pa.Table, kb: int) -> pa.Table:
    """A block of files as the read stage makes it, stamped when made."""
    n = batch.num_rows
    data = pa.array([np.random.bytes(kb * 1024) for _ in range(n)], pa.large_binary())
    return pa.table({"id": batch.column("id"), "data": data, "made": pa.array([time.time()] * n)})


class Consume:
    """Takes ``seconds`` per image, like an inference actor, without using CPU."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        time.sleep(self.seconds * batch.num_rows)
        n = batch.num_rows
        return pa.table({"made": batch.column("made"), "start": pa.array([start] * n), "end": pa.array([time.time()] * n)})


def run(images: int, seconds: float, kb: int, capped: bool) -> dict:
    import ray.data

    block = images_per_block(images, 1)
    cap = object_store_cap(1, block)
    with job_context(cap) if capped else contextlib.nullcontext():
        ds = ray.data.from_items([{"id": i} for i in range(images)], override_num_blocks=-(-images // block))
        ds = ds.map_batches(produce, fn_kwargs={"kb": kb}, batch_format="pyarrow", batch_size=block, num_cpus=IO_CPUS,
                            compute=read_compute(1))
        ds = ds.map_batches(Consume, fn_constructor_args=(seconds,), batch_format="pyarrow", batch_size=block,
                            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
                            num_cpus=1)
        t = time.time()
        rows = ds.take_all()
        wall = time.time() - t
    ahead = max_ahead([r["made"] for r in rows], [r["start"] for r in rows])
    return {"images": images, "block": block, "kb_per_image": kb, "capped": capped, "cap_bytes": cap if capped else None,
            "read_tasks": read_compute(1).size, "max_images_ahead": ahead, "max_mb_ahead": ahead * kb / 1024,
            "wall_s": wall, "consumer_busy": busy(images * seconds, [r["start"] for r in rows], [r["end"] for r in rows])}


def max_ahead(made: list[float], starts: list[float]) -> int:
    """The most images made but not yet started by the consumer, at any of its starts."""
    made, starts = np.sort(made), np.sort(starts)
    return int(max(np.searchsorted(made, s, side="right") - np.searchsorted(starts, s, side="left") for s in starts))


def busy(work_s: float, starts: list[float], ends: list[float]) -> float:
    """The consumer's share of the time from its first start to its last end spent on ``work_s``."""
    return work_s / (max(ends) - min(starts))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="400,1600", help="dataset sizes (default 400,1600)")
    p.add_argument("--seconds", type=float, default=0.01, help="consumer seconds per image (default 0.01)")
    p.add_argument("--kb", type=int, default=2048, help="bytes per file, in KiB (default 2048: a large photo)")
    p.add_argument("--out", default="bench-out/prefetch.json")
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        res = [run(n, args.seconds, args.kb, capped) for capped in (False, True)
               for n in map(int, args.images.split(","))]
    finally:
        ray.shutdown()
    print(f"{'object store':<24} | {'images':>6} | {'max read ahead':>18} | {'consumer busy':>13}")
    for r in res:
        cap = f"capped at {r['cap_bytes'] / 1e6:.0f} MB" if r["capped"] else "uncapped (Ray's default)"
        print(f"{cap:<24} | {r['images']:>6} | {r['max_images_ahead']:>5} img {r['max_mb_ahead']:>6.0f} MB | "
              f"{r['consumer_busy']:>12.0%}")
    harness.write_json(Path(args.out), res)
    print(f"written: {args.out}")
    return res


if __name__ == "__main__":
    main()

"""How far Ray Data prepares ahead of inference, with and without batchdet's
object-store cap (``batchdet.pipeline.job_context``), at growing dataset sizes.

Decoding and resizing an image takes milliseconds, inference seconds, so an
uncapped job prepares images far faster than the actors take them and holds
the difference in the object store: memory that grows with the dataset. This
script runs the pipeline's data path with the pipeline's own block size and
cap, the producer making blocks of 3×1200×1200 uint8 images (no decoding:
only the flow is measured) and one actor consuming them at a fixed rate
(sleeping, so that it does not compete for CPU), and reports the most images
prepared but not yet consumed at any moment, and whether the actor waited.

    python benchmarks/prefetch.py --out bench-out/prefetch.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchdet.pipeline import PREPARE_BATCH, PREPARE_CPUS, job_context
from batchdet.stages import IMAGE_BYTES, image_column


def produce(batch: pa.Table) -> pa.Table:
    """A block of images as the prepare stage makes it, stamped when made."""
    n = batch.num_rows
    image = image_column(np.full((n, IMAGE_BYTES), 128, np.uint8), [True] * n)
    return pa.table({"id": batch.column("id"), "image": image, "made": pa.array([time.time()] * n)})


class Consume:
    """Takes ``seconds`` per image, like an inference actor, without using CPU."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        time.sleep(self.seconds * batch.num_rows)
        n = batch.num_rows
        return pa.table({"made": batch.column("made"), "start": pa.array([start] * n), "end": pa.array([time.time()] * n)})


def run(images: int, seconds: float, capped: bool) -> dict:
    import ray.data

    ctx = job_context(1) if capped else ray.data.DataContext.get_current().copy()
    with ray.data.DataContext.current(ctx):
        ds = ray.data.from_items([{"id": i} for i in range(images)], override_num_blocks=images // PREPARE_BATCH)
        ds = ds.map_batches(produce, batch_format="pyarrow", batch_size=PREPARE_BATCH, num_cpus=PREPARE_CPUS)
        ds = ds.map_batches(Consume, fn_constructor_args=(seconds,), batch_format="pyarrow", batch_size=4,
                            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
                            num_cpus=1)
        t = time.time()
        rows = ds.take_all()
        wall = time.time() - t
    made = np.sort([r["made"] for r in rows])
    starts = np.sort([r["start"] for r in rows])
    # images made but not yet started by the consumer, at each consumer start;
    # busy: the consumer's share of the time from its first image to its last
    ahead = int(max(np.searchsorted(made, s, side="right") - np.searchsorted(starts, s, side="left") for s in starts))
    return {"images": images, "capped": capped, "cap_bytes": ctx.execution_options.resource_limits.object_store_memory
            if capped else None, "max_images_ahead": ahead, "max_mb_ahead": ahead * IMAGE_BYTES / 1e6,
            "wall_s": wall, "consumer_busy": images * seconds / (max(r["end"] for r in rows) - starts[0])}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="80,320", help="dataset sizes (default 80,320)")
    p.add_argument("--seconds", type=float, default=0.05, help="consumer seconds per image (default 0.05)")
    p.add_argument("--out", default="bench-out/prefetch.json")
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        res = [run(n, args.seconds, capped) for capped in (False, True) for n in map(int, args.images.split(","))]
    finally:
        ray.shutdown()
    print(f"{'object store':<24} | {'images':>6} | {'max prepared ahead':>18} | {'consumer busy':>13}")
    for r in res:
        cap = f"capped at {r['cap_bytes'] / 1e6:.0f} MB" if r["capped"] else "uncapped (Ray's default)"
        print(f"{cap:<24} | {r['images']:>6} | {r['max_images_ahead']:>5} img {r['max_mb_ahead']:>6.0f} MB | "
              f"{r['consumer_busy']:>12.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"written: {args.out}")
    return res


if __name__ == "__main__":
    main()

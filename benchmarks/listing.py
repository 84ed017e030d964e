"""Listing a large prefix on an S3 endpoint: serial against by-prefix (issue 16, item 3).

A moto S3 server on 127.0.0.1, in its own process, holds N keys laid out as
image buckets usually are (``photos/<NNNN>/img<NNNNNNN>.jpg``, 1,000 per
folder). The keys are put straight into moto's store (PUT over HTTP runs at
~60 keys/s here); the listing itself goes over HTTP through s3fs, as in
production. Each page of a listing can be delayed by ``--latency-ms`` to stand
for a real store's round trip (moto answers from memory; S3 takes tens of
milliseconds a page). For each N and latency it times:

- ``serial``: one listing of the whole prefix (``fs.find``: what batchdet did before);
- ``by_prefix``: ``listing.find_files`` (LIST_WORKERS sub-prefixes at once),
  with the progress callback counting its reports.

    python benchmarks/listing.py --sizes 10000,100000 --latency-ms 0,50 --json listing.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import header, parser, print_rows

BUCKET = "bench"
PREFIX = "photos"
PER_FOLDER = 1000


def serve(n: int, latency_ms: float) -> None:
    """Run a moto S3 server holding ``n`` keys; print its port; serve until stdin closes."""
    import logging

    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    backend = s3_backends["123456789012"]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    for i in range(n):
        backend.put_object(BUCKET, f"{PREFIX}/{i // PER_FOLDER:04d}/img{i:07d}.jpg", b"")
    app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ, start_response):  # one round trip per listing page
        if environ["REQUEST_METHOD"] == "GET" and "list-type" in environ.get("QUERY_STRING", ""):
            time.sleep(latency_ms / 1000)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed, threaded=True)
    print(server.server_port, flush=True)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


def measure(n: int, latency_ms: float) -> dict:
    import s3fs

    from batchdet.pipeline.listing import LIST_WORKERS, find_files

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    t = time.perf_counter()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(n), str(latency_ms)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(server.stdout.readline())
        fill_s = time.perf_counter() - t
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        figures = {"n": n, "latency_ms": latency_ms, "fill_s": round(fill_s, 1), "workers": LIST_WORKERS}
        for name, workers in (("serial", 1), ("by_prefix", LIST_WORKERS)):
            fs = s3fs.S3FileSystem(**options, skip_instance_cache=True, use_listings_cache=False)
            reports: list[int] = []
            t = time.perf_counter()
            files = find_files(fs, f"{BUCKET}/{PREFIX}", workers=workers, on_progress=reports.append)
            seconds = time.perf_counter() - t
            if len(files) != n or len(set(files)) != n:
                raise RuntimeError(f"{name}: listed {len(files)} keys ({len(set(files))} distinct), expected {n}")
            figures[name] = way_figures(n, seconds, len(reports))
        figures["speedup"] = round(figures["serial"]["seconds"] / figures["by_prefix"]["seconds"], 2)
        return figures
    finally:
        server.stdin.close()
        server.wait(30)


def way_figures(n: int, seconds: float, reports: int) -> dict:
    """One way of listing ``n`` keys: its seconds (rounded as printed), keys per second and progress reports."""
    return {"seconds": round(seconds, 2), "keys_per_s": round(n / seconds), "progress_reports": reports}


def table(results: list[dict]) -> str:
    lines = [f"{'keys':>8} {'latency ms':>10} | {'serial s':>8} {'keys/s':>7} | {'by prefix s':>11} {'keys/s':>7} "
             f"{'reports':>7} | {'speed-up':>8}"]
    for r in results:
        s, p = r["serial"], r["by_prefix"]
        lines.append(f"{r['n']:>8} {r['latency_ms']:>10g} | {s['seconds']:>8.2f} {s['keys_per_s']:>7} | "
                     f"{p['seconds']:>11.2f} {p['keys_per_s']:>7} {p['progress_reports']:>7} | {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "10000,100000", "keys")
    p.add_argument("--latency-ms", default="0,50", help="comma-separated delays per listing page")
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), float(args.serve[1]))
        return 0
    info = header()
    results = print_rows(table, (measure(int(n), float(latency)) for n in args.sizes.split(",")
                                 for latency in args.latency_ms.split(",")))
    if args.json_out:
        harness.write_json(Path(args.json_out), {**info, "results": results})
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

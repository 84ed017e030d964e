"""The ``batchdet`` command: a thin layer over the Python API.

Every command parses its flags, calls one library function and prints what it
returns. Errors a user can fix (bad flags, a wrong model, an unreachable URL)
come out as one line ``batchdet: error: …`` with exit status 2; set
``BATCHDET_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from batchdet import __version__


def _storage_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable)",
    )


STANDIN_WARNING = (
    "!! STAND-IN MODEL: random weights with the official architecture. Its detections are\n"
    "!! meaningless; run `batchdet model fetch` for the official MLPerf weights."
)


# --- detect / demo ------------------------------------------------------------
def _print_result(result) -> None:
    print(result.to_text())
    if not result.model["official"]:
        print(STANDIN_WARNING)


def _cmd_detect(args: argparse.Namespace) -> int:
    from batchdet.api import detect
    from batchdet.plan import parse_actors, parse_dataset
    from batchdet.storage import parse_storage_options

    datasets: dict[str, str] = {}
    for spec in args.dataset:
        name, url = parse_dataset(spec)
        if name in datasets:
            raise ValueError(f"dataset {name!r} given twice")
        datasets[name] = url
    result = detect(
        datasets, args.output, model=args.model, score_threshold=args.score_threshold,
        actors=parse_actors(args.actors) if args.actors else None,
        threads_per_actor=args.threads_per_actor, gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size, address=args.address,
        storage_options=parse_storage_options(args.storage_option), max_pixels=args.max_pixels,
    )
    _print_result(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batchdet.api import detect
    from batchdet.demo import demo_model, prepare_demo

    root = Path(args.output).resolve()
    model, official = demo_model()
    if not official:
        print(STANDIN_WARNING)
    datasets = prepare_demo(root)
    print(f"demo images: {root / 'images'} ({', '.join(datasets)}, one broken file on purpose)")
    result = detect(datasets, str(root / "output"), model=model)
    _print_result(result)
    return 0


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    from batchdet.preprocess import DEFAULT_MAX_PIXELS
    from batchdet.spec import NMS_SCORE_THRESHOLD

    p = sub.add_parser("detect", help="run the detector over datasets into partitioned Parquet")
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=URL",
                   help="a folder/prefix (searched recursively) or glob; local, file://, s3://, any fsspec URL")
    p.add_argument("--output", required=True, metavar="URL", help="where dataset=<NAME>/ partitions go")
    p.add_argument("--model", metavar="PATH", help="ONNX file (default: $BATCHDET_MODEL, else the fetch cache)")
    p.add_argument("--score-threshold", type=float, default=NMS_SCORE_THRESHOLD)
    p.add_argument("--actors", metavar="MIN[:MAX]", help="inference actor pool (default 1:CPUs/threads)")
    p.add_argument("--threads-per-actor", type=int, help="onnxruntime threads (default: node CPUs, at most 4)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4, help="images per inference batch")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images declaring more pixels than this (decompression bombs)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    _storage_flag(p)
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("demo", help="synthesize two small datasets and run detect on them, offline")
    p.add_argument("--output", default="batchdet-demo-output", metavar="DIR")
    p.set_defaults(func=_cmd_demo)


# --- model ------------------------------------------------------------------
def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from batchdet.fetch import fetch_model

    def progress(done: int, total: int | None) -> None:
        of = f" of {total / 1e6:.1f}" if total else ""
        print(f"\r  {done / 1e6:.1f}{of} MB", end="", file=sys.stderr, flush=True)

    path = fetch_model(url=args.url, to=args.to, progress=progress)
    print(file=sys.stderr)
    print(f"official model ready: {path}")
    return 0


def _cmd_model_standin(args: argparse.Namespace) -> int:
    from batchdet.fetch import resolve_model_path
    from batchdet.standin import write_standin

    to = args.to or resolve_model_path(None).with_name("standin-ssd1200.onnx")
    path = write_standin(to, seed=args.seed, channels_divisor=args.channels_divisor)
    print(f"stand-in written: {path}")
    print("  random weights: its detections are meaningless; use it for pipelines, speed and scale only")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from batchdet.spec import check_model

    info = check_model(args.path)
    print(f"path:        {info.path}")
    print(f"kind:        {info.kind}")
    print(f"official:    {'yes' if info.official else 'no'}")
    print(f"sha256:      {info.sha256}")
    print(f"size:        {info.size:,} bytes")
    print(f"parameters:  {info.parameters:,}")
    print(f"opset:       {info.opset}")
    print(f"input:       image {list(info.input_shape)} float32 RGB, (x/255 - mean)/std")
    for name, shape in info.outputs.items():
        print(f"output:      {name} {list(shape)}")
    for key, value in sorted(info.metadata.items()):
        print(f"metadata:    {key} = {value}")
    return 0


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="get, build or inspect the ONNX model")
    msub = model.add_subparsers(dest="model_command", required=True)

    p = msub.add_parser("fetch", help="download the official MLPerf file (size and sha256 checked)")
    p.add_argument("--url", help="source URL (default: zenodo, then the Open Model Zoo mirror)")
    p.add_argument("--to", help="destination (default: $BATCHDET_MODEL or the cache path)")
    p.set_defaults(func=_cmd_model_fetch)

    p = msub.add_parser("standin", help="build a same-architecture model with random weights")
    p.add_argument("--to", help="destination (default: standin-ssd1200.onnx in the model cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-divisor", type=int, default=1,
                   help="divide every channel count (8 gives the narrow model used in tests)")
    p.set_defaults(func=_cmd_model_standin)

    p = msub.add_parser("info", help="interface, parameters, sha256, official or not")
    p.add_argument("path")
    p.set_defaults(func=_cmd_model_info)


# --- output commands (query, summary, eval, draw) ----------------------------
def _add_output_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a finished output directory."""


# --- entry point --------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchdet",
        description="Batch object detection with MLPerf SSD-ResNet34 1200x1200 on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"batchdet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_model_commands(sub)
    _add_output_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, OSError) as e:
        if os.environ.get("BATCHDET_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"batchdet: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchdet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

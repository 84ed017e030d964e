"""The ``batchdet`` command: a thin layer over the Python API.

Every command parses its flags, calls one library function and prints what it
returns. Errors a user can fix (bad flags, a wrong model, an unreachable URL)
come out as one line ``batchdet: error: …`` with exit status 2; set
``BATCHDET_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Callable

from batchdet import __version__

if TYPE_CHECKING:
    from batchdet.options import DetectOptions


def _storage_flag(parser: argparse.ArgumentParser) -> None:
    from batchdet.options import STORAGE_OPTION_HELP

    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=STORAGE_OPTION_HELP)


STANDIN_WARNING = (
    "!! STAND-IN MODEL: made-up weights with the official architecture. Its detections are\n"
    "!! meaningless; run `batchdet model fetch` for the official MLPerf weights."
)


# --- detect / demo ------------------------------------------------------------
def _print_result(result) -> None:
    from batchdet.model.spec import STANDIN

    print(result.to_text())  # its "model:" line says what the model is, in one line
    if result.model.get("kind_id") == STANDIN:
        print(STANDIN_WARNING)


def _cmd_detect(args: argparse.Namespace) -> int:
    from batchdet.config import options_from_args

    _detect_on_console(options_from_args(args), args.verbose)
    return 0


def _detect_on_console(options: DetectOptions, verbose: bool) -> None:
    """``detect`` with one progress line on the terminal and everything else
    Ray prints in a log file, named after the summary (or after the error);
    all of it on the terminal with ``verbose``."""
    from batchdet.api import run
    from batchdet.console import run_console
    from batchdet.pipeline.preprocess import own_pixel_limit

    own_pixel_limit()  # the command's process is batchdet's: --max-pixels alone bounds an image, as in an actor
    log = None
    try:
        with run_console(verbose) as (progress, log):
            result = run(options, on_progress=progress, on_listing=progress.listing, ray_log=log or False)
        _print_result(result)
    finally:
        if log is not None:
            print(f"  log: {log}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batchdet.demo import demo_model, prepare_demo
    from batchdet.options import DetectOptions
    from batchdet.output.query import EXAMPLES, query, write_result

    root = Path(args.output).resolve()
    model, official = demo_model()
    if not official:
        print(STANDIN_WARNING)
    datasets = prepare_demo(root)
    print(f"demo images: {root / 'images'} ({', '.join(datasets)}, one broken file on purpose)")
    _detect_on_console(DetectOptions(datasets, str(root / "output"), model=model), args.verbose)
    title, sql = EXAMPLES[0]
    print(f"\n{title}:\n  batchdet query {root / 'output'} \"{sql}\"")
    write_result(query(str(root / "output"), sql), "table", sys.stdout, max_rows=10)
    print(f"\nnext: batchdet summary {root / 'output'}")
    print(f"      batchdet draw {root / 'output'} --dataset street --to {root / 'drawn'}")
    return 0


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    from batchdet.config import add_detect_arguments
    from batchdet.console import add_verbose_flag

    p = sub.add_parser("detect", help="run the detector over datasets into partitioned Parquet")
    add_detect_arguments(p)
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("demo", help="synthesize two small datasets and run detect on them, offline")
    p.add_argument("--output", default="batchdet-demo-output", metavar="DIR")
    add_verbose_flag(p)
    p.set_defaults(func=_cmd_demo)


# --- model ------------------------------------------------------------------
def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from batchdet.model.fetch import fetch_model

    def progress(done: int, total: int | None) -> None:
        of = f" of {total / 1e6:.1f}" if total else ""
        print(f"\r  {done / 1e6:.1f}{of} MB", end="", file=sys.stderr, flush=True)

    path = fetch_model(url=args.url, to=args.to, progress=progress)
    print(file=sys.stderr)
    print(f"official model ready: {path}")
    return 0


def _cmd_model_standin(args: argparse.Namespace) -> int:
    from batchdet.model.fetch import resolve_model_path
    from batchdet.model.standin import write_standin

    to = args.to or resolve_model_path(None).with_name("standin-ssd1200.onnx")
    path = write_standin(to, seed=args.seed, channels_divisor=args.channels_divisor, opset=args.opset,
                         smooth=args.smooth)
    print(f"stand-in written: {path} (opset {args.opset})")
    if args.smooth:
        print("  smooth weights: its detections are stable enough to compare (batchdet against the reference,\n"
              "  INT8 against FP32) but meaningless; use it for fidelity, pipelines, speed and scale only")
    else:
        print("  random weights: its detections are meaningless; use it for pipelines, speed and scale only")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from batchdet.model.spec import OFFICIAL_SHA256, STANDIN, check_model

    info = check_model(args.path)
    print(f"path:        {info.path}")
    print(f"kind:        {info.kind}")
    print(f"official:    {'yes' if info.official else 'no'}")
    print(f"sha256:      {info.sha256}")
    if info.int8:
        source = " (the official file)" if info.source_sha256 == OFFICIAL_SHA256 else ""
        print(f"quantized:   by batchdet from sha256 {info.source_sha256 or '(not recorded)'}{source}")
    print(f"size:        {info.size:,} bytes")
    print(f"parameters:  {info.parameters:,}")
    print(f"opset:       {info.opset_text}")
    print(f"input:       image {list(info.input_shape)} float32 RGB, (x/255 - mean)/std")
    for name, shape in info.outputs.items():
        print(f"output:      {name} {list(shape)}")
    for key, value in sorted(info.metadata.items()):
        print(f"metadata:    {key} = {value}")
    if info.kind_id == STANDIN:
        print(STANDIN_WARNING)
    return 0


def _cmd_model_quantize(args: argparse.Namespace) -> int:
    from batchdet.model.fetch import resolve_model_path
    from batchdet.model.quantize import calibration_samples, compare_speed, int8_cpu_flags, int8_cpu_hint, quantize_model
    from batchdet.model.spec import STANDIN, check_model
    from batchdet.storage import parse_storage_options

    def progress(done: int, total: int) -> None:
        print(f"\r  calibration image {done} of {total}", end="", file=sys.stderr, flush=True)

    source = resolve_model_path(args.model)
    storage_options = parse_storage_options(args.storage_option)
    path = quantize_model(source, args.calibrate, images=args.images, to=args.to,
                          storage_options=storage_options, progress=progress)
    print(file=sys.stderr)
    info = check_model(path)
    print(f"int8 model written: {path} ({info.size / 1e6:.1f} MB, from {source})")
    print(f"  kind: {info.kind}")
    print(f"  {info.metadata.get('batchdet.quantized', '')}")
    print(f"  calibration: {info.metadata.get('batchdet.quantized.calibration', '')}")
    if not args.no_measure:
        print("  timing FP32 and INT8 on calibration images (--no-measure skips this) ...", file=sys.stderr)
        samples = calibration_samples(args.calibrate, args.images, storage_options=storage_options)
        print(f"  {compare_speed(source, path, samples).to_text()}")
    hint = int8_cpu_hint(int8_cpu_flags())
    if hint:
        print(f"  {hint}")
    print(f"  run it with --model {path}; check its accuracy with `batchdet eval` (docs/model.md, 'INT8')")
    if info.kind_id == STANDIN:
        print(STANDIN_WARNING)
    return 0


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    from batchdet.model.spec import OFFICIAL_MIN_OPSET, STANDIN_OPSETS

    model = sub.add_parser("model", help="get, build or inspect the ONNX model")
    msub = model.add_subparsers(dest="model_command", required=True)

    p = msub.add_parser("fetch", help="download the official MLPerf file (size and sha256 checked)")
    p.add_argument("--url", help="source URL (default: zenodo, then the Open Model Zoo mirror)")
    p.add_argument("--to", help="destination (default: $BATCHDET_MODEL or the cache path)")
    p.set_defaults(func=_cmd_model_fetch)

    p = msub.add_parser("standin", help="build a same-architecture model with random (or smooth) weights")
    p.add_argument("--to", help="destination (default: standin-ssd1200.onnx in the model cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-divisor", type=int, default=1,
                   help="divide every channel count (8 gives the narrow model used in tests)")
    p.add_argument("--opset", type=int, default=OFFICIAL_MIN_OPSET, choices=STANDIN_OPSETS, metavar="N",
                   help=f"ONNX opset to build at, {STANDIN_OPSETS[0]}..{STANDIN_OPSETS[-1]} (default "
                        f"{OFFICIAL_MIN_OPSET}: the lowest the official file can have; same outputs at each)")
    p.add_argument("--smooth", action="store_true",
                   help="weights chosen so that detections are stable under noise, as a trained network's: "
                        "for comparing detections (docs/model.md, \"Stand-ins\")")
    p.set_defaults(func=_cmd_model_standin)

    p = msub.add_parser("info", help="interface, parameters, sha256, official or not")
    p.add_argument("path")
    p.set_defaults(func=_cmd_model_info)

    from batchdet.model.quantize import DEFAULT_IMAGES

    p = msub.add_parser("quantize", help="static INT8 copy (QDQ, per-channel) calibrated on a dataset's images",
                        description="Write <name>.int8.onnx beside MODEL: static INT8 quantization of the "
                                    "convolutions (onnxruntime QDQ, per-channel weights), calibrated on images "
                                    "of a dataset URL; decode and NMS stay float. Use it with --model.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="ONNX model to quantize (default: $BATCHDET_MODEL, else the fetch cache)")
    p.add_argument("--calibrate", required=True, metavar="URL",
                   help="dataset (folder/prefix/glob, any fsspec URL) whose images calibrate the activation ranges")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                   help=f"calibration images, spread over the listing (default {DEFAULT_IMAGES})")
    p.add_argument("--to", metavar="PATH", help="destination (default: <model dir>/<name>.int8.onnx)")
    p.add_argument("--no-measure", action="store_true",
                   help="skip timing FP32 against INT8 on a few calibration images afterwards")
    _storage_flag(p)
    p.set_defaults(func=_cmd_model_quantize)


# --- output commands (query, summary, eval, draw, verify) --------------------
def _cmd_query(args: argparse.Namespace) -> int:
    from batchdet.output.query import connect, render_overview, run_sql, view_columns, write_result
    from batchdet.storage import parse_storage_options

    con = connect(args.output, parse_storage_options(args.storage_option))
    if args.sql is None:
        print(render_overview(view_columns(con)), end="")
        return 0
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    write_result(run_sql(con, sql), args.format, sys.stdout, max_rows=args.max_rows)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from batchdet.output.summary import render_summary, summarize
    from batchdet.storage import parse_storage_options

    summary = summarize(args.output, parse_storage_options(args.storage_option),
                        min_score=args.min_score, top=args.top)
    print(render_summary(summary), end="")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from batchdet.output.evaluate import evaluate, render_eval
    from batchdet.storage import parse_storage_options

    result = evaluate(args.output, args.annotations, args.dataset, parse_storage_options(args.storage_option))
    print(render_eval(result), end="")
    json_out = Path(args.json_out or f"eval-{args.dataset}.json")
    json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    print(f"numbers written to {json_out}")
    return 0


def _cmd_draw(args: argparse.Namespace) -> int:
    from batchdet.output.draw import draw
    from batchdet.storage import parse_storage_options

    report = draw(args.output, args.dataset, args.to, limit=args.limit, min_score=args.min_score,
                  storage_options=parse_storage_options(args.storage_option))
    print(f"drew {len(report.drawn):,} images, skipped {len(report.skipped):,}"
          + (f", left out {report.not_drawn:,} (--limit)" if report.not_drawn else ""))
    print(f"open {report.index}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from batchdet.storage import parse_storage_options
    from batchdet.verify import verify

    report = verify(args.output, parse_storage_options(args.storage_option), sample=args.sample,
                    seed=args.seed, model=args.model)
    print(report.to_text(), end="")
    return 0 if report.ok else 1


def _add_output_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a finished output directory."""
    output_help = "the output of detect: a local path or any fsspec URL (s3://bucket/prefix)"

    p = sub.add_parser("query", help="SQL over the images and detections views (DuckDB)",
                       description="SQL over two views: images (one row per image) and detections "
                                   "(one row per detection). Without SQL: the views' columns and examples.")
    p.add_argument("output", help=output_help)
    p.add_argument("sql", nargs="?", help="the query; '-' reads it from stdin; omit to see the views and examples")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table: aligned text (cut at --max-rows); csv; json: JSON Lines, one object per row")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default 40)")
    _storage_flag(p)
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("summary", help="per-dataset counts, top classes and the runs that wrote an output")
    p.add_argument("output", help=output_help)
    p.add_argument("--min-score", type=float, default=0.5, help="score for the top-classes counts (default 0.5)")
    p.add_argument("--top", type=int, default=5, help="classes listed per dataset (default 5)")
    _storage_flag(p)
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("eval", help="COCO bbox AP/AR of one dataset against COCO annotations (pycocotools)")
    p.add_argument("output", help=output_help)
    p.add_argument("--annotations", required=True, metavar="FILE",
                   help="COCO instances JSON, e.g. instances_val2017.json (local or fsspec URL)")
    p.add_argument("--dataset", required=True, metavar="NAME", help="the dataset of the output to evaluate")
    p.add_argument("--json-out", metavar="FILE", help="where to write the numbers (default ./eval-NAME.json)")
    _storage_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("draw", help="draw boxes on the images of a dataset, with an HTML gallery")
    p.add_argument("output", help=output_help)
    p.add_argument("--dataset", required=True, metavar="NAME")
    p.add_argument("--to", required=True, metavar="DIR", help="local directory for the images and index.html")
    p.add_argument("--limit", type=int, metavar="N", help="draw at most N images (default all)")
    p.add_argument("--min-score", type=float, default=0.5, help="draw boxes at this score or above (default 0.5)")
    _storage_flag(p)
    p.set_defaults(func=_cmd_draw)

    from batchdet.verify import DEFAULT_SAMPLE

    p = sub.add_parser("verify", help="check an output's files and counts, and re-detect a sample of its rows",
                       description="Check that every committed run's files are there, readable and add up to its "
                                   "manifest, that each image has one current row under one set of result "
                                   "settings; then re-read a random sample of rows' images (same sha256?) and "
                                   "re-detect them with the recorded model. Exit 1 naming each mismatch.")
    p.add_argument("output", help=output_help)
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"current rows to re-read and re-detect (default {DEFAULT_SAMPLE}; 0: structure only)")
    p.add_argument("--seed", type=int, metavar="N", help="pick the same sample again (default: a random seed, printed)")
    p.add_argument("--model", metavar="PATH",
                   help="a copy of the recorded model to use (default: the path each run's manifest records); "
                        "its sha256 must be the recorded one")
    _storage_flag(p)
    p.set_defaults(func=_cmd_verify)


# --- cluster commands (submit) ------------------------------------------------
def _cmd_submit(args: argparse.Namespace) -> int:
    from batchdet.cluster.submit import submit

    return submit(args.address, args.detect_args, config=args.config, wait=not args.no_wait,
                  pip_deps=args.pip_deps, runtime_env_file=args.runtime_env, insecure=args.insecure)


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that run batchdet on a Ray cluster (see README, 'Running on a cluster')."""
    p = sub.add_parser(
        "submit", help="run detect on a Ray cluster through the Jobs API; exit status is the job's",
        description="Validate the detect arguments here, submit them as a Ray job (batchdet shipped in the "
                    "runtime environment), stream its logs and exit 0 only if it SUCCEEDED. The Ray token is "
                    "read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
        usage="batchdet submit [--address URL] [--no-wait] [--config FILE] [...] -- <detect arguments>",
    )
    p.add_argument("--address", metavar="URL",
                   help="the cluster's dashboard / Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--config", metavar="FILE", help="job spec YAML, as for detect --config (the arguments override it)")
    p.add_argument("--runtime-env", metavar="FILE", help="YAML merged over the runtime environment batchdet builds")
    p.add_argument("--pip-deps", action="store_true",
                   help="pip-install batchdet's dependencies on the cluster (for images that lack them)")
    p.add_argument("--insecure", action="store_true",
                   help="submit even to a cluster whose dashboard accepts requests without a token")
    p.add_argument("detect_args", nargs=argparse.REMAINDER, metavar="-- DETECT_ARGS",
                   help="the arguments of batchdet detect, after --")
    p.set_defaults(func=_cmd_submit)


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
    _add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "func", None) is _cmd_submit:  # the usual slip: detect's flags without --
        parser.error("batchdet submit takes detect's arguments after --: "
                     "batchdet submit [--address URL] [--config FILE] -- --dataset NAME=URL --output URL ...")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("batchdet: %(message)s"))
    log = logging.getLogger("batchdet")
    if not log.handlers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    from batchdet.errors import TaskFailed

    try:
        return func(args)
    except (ValueError, OSError, TaskFailed) as e:
        if os.environ.get("BATCHDET_DEBUG"):
            raise
        from batchdet.errors import one_line

        print(f"batchdet: error: {one_line(e, with_type=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchdet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``detect``'s options: one frozen type, each option's default, check and help written once.

The Python API (:func:`batchdet.api.detect`), the ``batchdet detect`` flags
(:func:`add_flags` makes them from the fields), job specs
(:mod:`batchdet.config`) and ``batchdet submit`` all build a
:class:`DetectOptions`, so they accept and refuse the same values, with the
same one-line ValueError naming the option (``'max_pixels' must be >= 1, got 0``).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, Mapping

from batchdet.model.spec import NMS_SCORE_THRESHOLD
from batchdet.output.schema import check_dataset_name
from batchdet.progress import DEFAULT_STALL_S
from batchdet.storage import parse_storage_options

#: Rows Ray collects before writing a Parquet file. Fewer, larger files query
#: faster; smaller ones lose less work when a run is killed (what is not yet
#: in a file is redone by --resume). 64 images is ~3 minutes of one 2-core
#: node's work with the full model.
DEFAULT_ROWS_PER_FILE = 64
#: Pixels an image may declare before it is refused unread (width × height).
#: 100 MP is 300 MB once decoded; it bounds memory per image whatever the
#: header claims (the pipeline's decoder reads its default from here).
DEFAULT_MAX_PIXELS = 100_000_000
#: Help of every command's ``--storage-option``.
STORAGE_OPTION_HELP = "fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable)"


# --- checks: (option name, value) → the value normalised, or ValueError naming the option ----------
def describe(value: Any) -> str:
    """``text 'x'``, ``a whole number 5``: what a refused value was, for the one-line message."""
    names = {str: "text", bool: "true/false", int: "a whole number", float: "a number", list: "a list",
             tuple: "a list", dict: "a mapping"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


def _bad(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{name!r} must be {expected}, got {describe(value)}")


def _text(name: str, value: Any) -> str:
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(value, str) or not value.strip():
        raise _bad(name, "non-empty text", value)
    return value


def _switch(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return value


def _one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise _bad(name, "one of " + ", ".join(repr(c) for c in choices), value)
        return value
    return check


def _whole(low: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, "a whole number", value)
        if value < low:
            raise ValueError(f"{name!r} must be >= {low}, got {value!r}")
        return value
    return check


def _number(low: float, high: float = math.inf) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, "a number", value)
        if not low <= value <= high:  # NaN fails too
            bound = f">= {low:g}" if high == math.inf else f"within [{low:g}, {high:g}]"
            raise ValueError(f"{name!r} must be {bound}, got {value!r}")
        return float(value)
    return check


def _actors(name: str, value: Any) -> tuple[int, int]:
    expected = 'N, "MIN:MAX" or [MIN, MAX] (whole numbers, 1 <= MIN <= MAX)'
    if isinstance(value, str):
        low, _, high = value.partition(":")
        try:
            bounds = (int(low), int(high or low))
        except ValueError:
            raise _bad(name, expected, value) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        bounds = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and not any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        bounds = (value[0], value[1])
    else:
        raise _bad(name, expected, value)
    if not 1 <= bounds[0] <= bounds[1]:
        raise _bad(name, expected, value)
    return bounds


def _datasets(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise _bad(name, "a non-empty mapping of NAME: URL", value)
    out = {}
    for key, url in value.items():
        try:
            check_dataset_name(str(key))
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
        url = os.fspath(url) if isinstance(url, os.PathLike) else url
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"{name!r}: {key!r} must be a URL (text), got {describe(url)}")
        out[str(key)] = url
    return out


def _storage(name: str, value: Any) -> dict[str, str | bool]:
    """Text or true/false only, as ``--storage-option KEY=VALUE`` gives them: a
    nested mapping could hide a secret from redaction and from ``submit``."""
    if not isinstance(value, Mapping):
        raise _bad(name, "a mapping of KEY: VALUE", value)
    out: dict[str, str | bool] = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name!r}: keys must be text, got {describe(key)}")
        if isinstance(v, (bool, str)):
            out[key] = v
        elif isinstance(v, (int, float)):
            out[key] = str(v)  # as --storage-option KEY=VALUE would pass it
        else:
            raise ValueError(f"{name!r}: {key!r} must be text or true/false, got {describe(v)}")
    return out


# --- reading a flag's text: what argparse gave → a value for the check --------------------------
def _as(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` where it can; else the text itself, which the check then refuses naming the option."""
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            return text
    return parse


def _numeral(text: str) -> int | float:
    """``"2"`` → 2, ``"0.5"`` → 0.5, as YAML reads them, so a refusal quotes the same value."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _dataset_flags(specs: list[str]) -> dict[str, str]:
    """``["coco=s3://b/val2017", …]`` → ``{"coco": "s3://b/val2017", …}``."""
    datasets: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not url:
            raise ValueError(f"bad --dataset {spec!r}: expected NAME=URL")
        if name in datasets:
            raise ValueError(f"dataset {name!r} given twice")
        datasets[name] = url
    return datasets


@dataclass(frozen=True)
class _Kind:
    """How one sort of option is checked, and read from its flag."""

    check: Callable[[str, Any], Any]
    parse: Callable[[Any], Any] = lambda text: text
    action: str = "store"


_TEXT = _Kind(_text)
_SWITCH = _Kind(_switch, action="store_true")
_POSITIVE = _Kind(_whole(1), _as(int))
_FRACTION = _Kind(_number(0, 1), _as(_numeral))
_NON_NEGATIVE = _Kind(_number(0), _as(_numeral))
_ACTORS = _Kind(_actors)
_DATASETS = _Kind(_datasets, _dataset_flags, "append")
_STORAGE = _Kind(_storage, parse_storage_options, "append")
#: Where ``detect`` runs its job (batchdet.pipeline.in_process.choose_execution).
EXECUTIONS = ("auto", "in-process", "ray")
_EXECUTION = _Kind(_one_of(*EXECUTIONS))
#: The arithmetic of the convolutions (batchdet.pipeline.precision): FP32 is
#: MLPerf's own, in which its accuracy target is defined, hence the default.
FP32, BF16, INT8 = "fp32", "bf16", "int8"
PRECISIONS = (FP32, BF16, INT8)
_PRECISION = _Kind(_one_of(*PRECISIONS))
#: What runs the model: onnxruntime (batchdet's default), OpenVINO (the
#: ``[openvino]`` extra; bf16 on CPUs that have it), or the fastest for the precision.
AUTO, ONNXRUNTIME, OPENVINO = "auto", "onnxruntime", "openvino"
ENGINES = (AUTO, ONNXRUNTIME, OPENVINO)
_ENGINE = _Kind(_one_of(*ENGINES))


def _option(kind: _Kind, help_text: str, metavar: str | None = None, flag: str | None = None) -> dict[str, Any]:
    """A field's metadata: its kind, its flag's help and metavar, and the flag when not ``--<name>``."""
    return {"kind": kind, "help": help_text, "metavar": metavar, "flag": flag}


@dataclass(frozen=True)
class DetectOptions:
    """Everything ``detect`` is told, checked on construction (ValueError naming the option).

    ``DetectOptions({"coco": "s3://b/val2017/"}, "s3://b/out/", batch_size=8)``.
    Values are normalised: ``actors`` becomes a (min, max) tuple, numbers in
    ``storage_options`` text.
    """

    datasets: dict[str, str] = field(metadata=_option(
        _DATASETS, "a folder/prefix (searched recursively), a glob or a .txt/.csv/.parquet list of URIs; "
                  "local, file://, s3://, any fsspec URL; repeat for several datasets", "NAME=URL", "--dataset"))
    output: str = field(metadata=_option(_TEXT, "where dataset=<NAME>/ partitions and _runs/ go", "URL"))
    model: str | None = field(default=None, metadata=_option(
        _TEXT, "ONNX file or fsspec URL, URL#sha256=<hex> pins it (default: $BATCHDET_MODEL, else the fetch cache)",
        "PATH"))
    score_threshold: float = field(default=NMS_SCORE_THRESHOLD, metadata=_option(
        _FRACTION, "detections below it are not stored; keep 0.05 for COCO AP", "SCORE"))
    actors: tuple[int, int] | None = field(default=None, metadata=_option(
        _ACTORS, "inference actor pool (default: CPUs/threads; on a cluster 1:CPUs/threads)", "MIN[:MAX]"))
    precision: str = field(default=FP32, metadata=_option(
        _PRECISION, "the convolutions' arithmetic: fp32 (MLPerf's); bf16 (OpenVINO, on CPUs with AVX512_BF16 or "
                    "AMX: ~2x fp32); int8 (the model's `batchdet model quantize` copy beside it). Check the "
                    "accuracy of bf16 and int8 with `batchdet eval` on your data", "|".join(PRECISIONS)))
    engine: str = field(default=AUTO, metadata=_option(
        _ENGINE, "what runs the model: auto (OpenVINO for bf16, else onnxruntime), onnxruntime, or openvino "
                 "(CPU only; pip install 'batchdet[openvino]')", "|".join(ENGINES)))
    threads_per_actor: int | None = field(default=None, metadata=_option(
        _POSITIVE, "onnxruntime threads per actor (default: 1, one actor per CPU; with GPUs the node's CPUs, "
                  "at most 4)", "N"))
    gpus_per_actor: float = field(default=0.0, metadata=_option(
        _NON_NEGATIVE, "GPUs per actor (fractions share a GPU); needs onnxruntime-gpu", "F"))
    batch_size: int | None = field(default=None, metadata=_option(
        _POSITIVE, "images per block, the unit handed to an actor (default: from the dataset size and actors, "
                  "at most 64; 256 on GPUs)", "N"))
    rows_per_file: int = field(default=DEFAULT_ROWS_PER_FILE, metadata=_option(
        _POSITIVE, "rows per Parquet file; work not yet in a file is redone after a kill", "N"))
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata=_option(
        _POSITIVE, "refuse images declaring more pixels than this (decompression bombs)", "N"))
    stall_timeout: float = field(default=DEFAULT_STALL_S, metadata=_option(
        _NON_NEGATIVE, "fail the run, naming the stage, when no image finishes for this long "
                      "(or 4x the longest gap between blocks, if longer; the first block may take "
                      "15 minutes at least: start-up); 0: never", "SECONDS"))
    resume: bool = field(default=False, metadata=_option(
        _SWITCH, "bring an output up to date: commit what killed runs left, skip images unchanged since their ok "
                 "row (same size and version), redo new, changed and failed ones, mark vanished ones missing; "
                 "refused if the result settings (model, --score-threshold, --max-pixels, --precision, engine) differ"))
    overwrite: bool = field(default=False, metadata=_option(_SWITCH, "delete the output's earlier results first"))
    address: str | None = field(default=None, metadata=_option(
        _TEXT, "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)", "ADDR"))
    execution: str = field(default="auto", metadata=_option(
        _EXECUTION, "ray: Ray Data (a cluster, or a Ray of its own here); in-process: this process alone, no Ray "
                    "to start; auto: in-process for up to 64 images on this machine (no --address, no $RAY_ADDRESS), "
                    "else ray", "|".join(EXECUTIONS)))
    storage_options: dict[str, str | bool] = field(default_factory=dict, metadata=_option(
        _STORAGE, STORAGE_OPTION_HELP, "KEY=VALUE", "--storage-option"))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:  # None where None is the default: left to the run
                object.__setattr__(self, f.name, check_option(f.name, value))
        if self.resume and self.overwrite:  # before anything is listed, and before facing another run's lease
            raise ValueError("'resume' and 'overwrite' contradict each other: choose one")

    def to_spec(self, *, defaults: bool = False) -> dict[str, Any]:
        """The options as job-spec keys; without ``defaults`` only those that differ from their
        default (what ``submit`` ships, so the cluster's batchdet fills in the rest)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if defaults or getattr(self, f.name) != _default(f)}


_FIELDS: dict[str, Field] = {f.name: f for f in fields(DetectOptions)}


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def option_names() -> tuple[str, ...]:
    """Every option, in the order of :class:`DetectOptions`' fields."""
    return tuple(_FIELDS)


def check_option(name: str, value: Any) -> Any:
    """``value`` normalised for option ``name``, or ValueError naming it (one line)."""
    return _FIELDS[name].metadata["kind"].check(name, value)


# --- the command line ---------------------------------------------------------------------------
def flag_name(name: str) -> str:
    """``batch_size`` → ``--batch-size``; ``datasets`` → ``--dataset``."""
    return _FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option. A flag not given is absent from the parsed
    namespace (``argparse.SUPPRESS``), so a job spec can fill it in."""
    for f in fields(DetectOptions):
        meta = f.metadata
        default = _default(f)
        shown = default not in (None, {}) and default is not MISSING and not isinstance(default, bool)
        note = (f" (default: {default:,})" if isinstance(default, (int, float)) else f" (default: {default})") * shown
        extra = {} if meta["kind"].action == "store_true" else {"metavar": meta["metavar"]}
        parser.add_argument(flag_name(f.name), dest=f.name, action=meta["kind"].action, default=argparse.SUPPRESS,
                            help=meta["help"] + note, **extra)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options given as flags in ``args`` (see :func:`add_flags`), ready for :class:`DetectOptions`."""
    given = vars(args)
    return {name: f.metadata["kind"].parse(given[name]) for name, f in _FIELDS.items() if name in given}

"""Job specs: one YAML file that says what ``batchdet detect`` should do.

::

    datasets:                      # required (here or as --dataset): NAME: URL
      coco-val2017: s3://my-bucket/coco/val2017/
    output: s3://my-bucket/detections/coco-val2017/   # required (here or --output)
    model: s3://my-bucket/models/resnet34-ssd1200.onnx
    model_sha256: b417a8186967f1e78670b0075aa72a10e5c7d1a6d5c08af9d13dc97f3d29ef0d
    score_threshold: 0.05
    actors: "2:8"                  # N, "MIN:MAX" or [MIN, MAX] (quoted: YAML reads 2:8 as 128)
    threads_per_actor: 4
    gpus_per_actor: 0
    batch_size: 4
    storage_options: {anon: false}  # as --storage-option KEY=VALUE: text or true/false

Every key is optional except ``datasets`` and ``output``, which may instead
come from the command line. The keys are :func:`batchdet.api.detect`'s
keyword arguments (plus ``model_sha256``, which pins a remote model; see
:mod:`batchdet.model.distribution`). Unknown keys, wrong types and duplicate keys
are refused with one line naming the key, before any work starts.

:func:`load_config` gives the keyword arguments of ``batchdet.api.detect``;
:func:`options_from_args` gives ``batchdet detect`` its ``--config FILE``:
defaults, then the file, then the flags given on the command line
(``--dataset`` replaces the file's datasets; ``--storage-option`` entries
are merged over the file's, key by key). Values are checked by
:mod:`batchdet.options`, as for the API and the flags.
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

import yaml

from batchdet.console import add_verbose_flag
from batchdet.options import (DetectOptions, add_flags, check_option, describe, flag_name, flag_values,
                              option_names)

#: Every key a job spec may hold: the options, and the pin of a remote model.
KEYS = (*option_names(), "model_sha256")


class ConfigError(ValueError):
    """A job spec is malformed; the one-line message names the file and the key."""


# --- loading --------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen[key] = loader.construct_object(value_node, deep=True)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a job spec file; values normalised (see :func:`parse_config`)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {source}: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_config(data, source)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments of :func:`batchdet.api.detect` from a job spec file::

        detect(**load_config("jobs/examples/coco-val2017-s3.yaml"))
    """
    return spec_values(read_config(path))


def parse_config(data: Any, source: str = "config") -> dict[str, Any]:
    """Check a parsed job spec; return it normalised as :mod:`batchdet.options`
    normalises values, ``model`` pinned to ``model_sha256`` when both are given."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys (datasets, output, …), got {describe(data)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(KEYS)})"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        if value is None:  # `model:` with nothing after it: as if absent
            continue
        try:
            out[key] = _sha256(value) if key == "model_sha256" else check_option(key, value)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    if "model_sha256" in out:
        if "model" not in out:
            raise ConfigError(f"{source}: 'model_sha256' needs 'model' (the URL it pins)")
        out["model"] = _pin(out["model"], out["model_sha256"], source)
    return out


def spec_values(spec: dict[str, Any]) -> dict[str, Any]:
    """A checked job spec → option values (``model_sha256`` is in ``model`` already)."""
    return {k: v for k, v in spec.items() if k != "model_sha256"}


def _sha256(value: Any) -> str:
    from batchdet.model.distribution import DistributionError, check_sha256

    if isinstance(value, str):
        try:
            return check_sha256(value)
        except DistributionError:
            pass
    raise ValueError(f"'model_sha256' must be 64 hexadecimal digits, got {describe(value)}")


def _pin(model: str, sha256: str, source: str) -> str:
    from batchdet.model.distribution import model_ref, split_ref

    location, pinned = split_ref(model)
    if pinned and pinned != sha256:
        raise ConfigError(f"{source}: 'model_sha256' {sha256} disagrees with the sha256 in 'model' ({pinned})")
    return model_ref(location, sha256)


# --- the command line: `batchdet detect --config FILE` ------------------------------
def add_detect_arguments(parser: argparse.ArgumentParser) -> None:
    """``batchdet detect``'s arguments; ``submit`` parses its detect arguments
    with them too, to refuse a typo on this machine before anything is sent."""
    add_flags(parser)  # one per option of batchdet.options.DetectOptions; --dataset/--output here or in --config
    add_verbose_flag(parser)
    parser.add_argument("--config", metavar="FILE",
                        help="job spec YAML (datasets, output, model, actors, …; see docs/cli.md, 'Job specs'); "
                             "flags override it")


def options_from_args(args: argparse.Namespace) -> DetectOptions:
    """``batchdet detect``'s options: defaults, then ``args.config``'s file,
    then the flags given; raise ValueError (one line) on a bad value or file,
    or when neither gives the datasets or the output."""
    path = args.config
    spec = spec_values(read_config(path)) if path else {}
    flags = flag_values(args)
    values = {**spec, **flags,
              "storage_options": {**spec.get("storage_options", {}), **flags.get("storage_options", {})}}
    missing = [flag_name(name) for name in ("datasets", "output") if name not in values]
    if missing:
        where = f" or in {path}" if path else " (or in a --config file)"
        raise ConfigError(f"the following arguments are required: {', '.join(missing)}{where}")
    return DetectOptions(**values)


def dump_config(config: dict[str, Any]) -> str:
    """A job spec as YAML text (tuples become lists)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)

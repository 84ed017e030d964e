"""Job specs: one YAML file that says what ``batchdet detect`` should do.

::

    datasets:                      # required (here or as --dataset): NAME: URL
      coco-val2017: s3://my-bucket/coco/val2017/
    output: s3://my-bucket/detections/coco-val2017/   # required (here or --output)
    model: s3://my-bucket/models/resnet34-ssd1200.onnx
    model_sha256: b417a8186967f1e78670b0075aa72a10e5c7d1a6d5c08af9d13dc97f3d29ef0d
    score_threshold: 0.05
    actors: 2:8                    # N, "MIN:MAX" or [MIN, MAX]
    threads_per_actor: 4
    gpus_per_actor: 0
    batch_size: 4
    storage_options: {anon: false}  # as --storage-option KEY=VALUE: text or true/false

Every key is optional except ``datasets`` and ``output``, which may instead
come from the command line. The keys are :func:`batchdet.api.detect`'s
keyword arguments (plus ``model_sha256``, which pins a remote model; see
:mod:`batchdet.distribution`). Unknown keys, wrong types and duplicate keys
are refused with one line naming the key, before any work starts.

:func:`load_config` gives the keyword arguments of ``batchdet.api.detect``;
:func:`config_aware` and :func:`apply_config` give ``batchdet detect`` its
``--config FILE``, where flags given on the command line override the file
(``--dataset`` replaces the file's datasets; ``--storage-option`` entries
are merged over the file's, key by key).
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

import yaml

#: key → kind. Kinds: datasets, options, actors, sha256, str, int, float, bool.
SCHEMA: dict[str, str] = {
    "datasets": "datasets",
    "output": "str",
    "model": "str",
    "model_sha256": "sha256",
    "score_threshold": "float",
    "actors": "actors",
    "threads_per_actor": "int",
    "gpus_per_actor": "float",
    "batch_size": "int",
    "max_pixels": "int",
    "rows_per_file": "int",
    "stall_timeout": "float",
    "resume": "bool",
    "overwrite": "bool",
    "address": "str",
    "storage_options": "options",
}
#: config key → the ``batchdet detect`` flag's dest, where they differ.
DESTS = {"datasets": "dataset", "storage_options": "storage_option"}
#: smallest value allowed for numeric keys.
MINIMUM = {"batch_size": 1, "threads_per_actor": 1, "max_pixels": 1, "rows_per_file": 1, "gpus_per_actor": 0,
           "score_threshold": 0, "stall_timeout": 0}


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
    return detect_kwargs(read_config(path))


def parse_config(data: Any, source: str = "config") -> dict[str, Any]:
    """Validate a parsed job spec; return it normalised: ``actors`` as a
    (min, max) tuple, storage option values as text or booleans."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys (datasets, output, …), got {_kind(data)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in SCHEMA:
            close = difflib.get_close_matches(str(key), SCHEMA, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(SCHEMA)})"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        if value is None:  # `model:` with nothing after it: as if absent
            continue
        out[key] = _check(SCHEMA[key], key, value, source)
    if "model_sha256" in out and "model" not in out:
        raise ConfigError(f"{source}: 'model_sha256' needs 'model' (the URL it pins)")
    return out


def detect_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A validated config → keyword arguments of :func:`batchdet.api.detect`."""
    kwargs = {k: v for k, v in config.items() if k != "model_sha256"}
    if "model_sha256" in config:
        kwargs["model"] = _pin(config["model"], config["model_sha256"])
    return kwargs


# --- validation -------------------------------------------------------------------
def _kind(value: Any) -> str:
    names = {str: "text", bool: "true/false", int: "a whole number", float: "a number", list: "a list",
             dict: "a mapping"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


def _check(kind: str, key: str, value: Any, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key!r} must be {expected}, got {_kind(value)}")

    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise bad("non-empty text")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return _at_least(key, value, source)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if key == "score_threshold" and not 0 <= value <= 1:
            raise ConfigError(f"{source}: 'score_threshold' must be within [0, 1], got {value!r}")
        return _at_least(key, float(value), source)
    if kind == "sha256":
        from batchdet.distribution import DistributionError, check_sha256

        if not isinstance(value, str):
            raise bad("64 hexadecimal digits")
        try:
            return check_sha256(value)
        except DistributionError:
            raise bad("64 hexadecimal digits") from None
    if kind == "actors":
        return _actors(value, bad, source)
    if kind == "datasets":
        return _datasets(value, bad, source)
    if kind == "options":
        return _options(value, bad, source)
    raise AssertionError(kind)


def _at_least(key: str, value, source: str):
    low = MINIMUM.get(key)
    if low is not None and value < low:
        raise ConfigError(f"{source}: {key!r} must be >= {low}, got {value!r}")
    return value


def _actors(value: Any, bad, source: str) -> tuple[int, int]:
    expected = 'N, "MIN:MAX" or [MIN, MAX] (whole numbers, 1 <= MIN <= MAX)'
    if isinstance(value, bool):
        raise bad(expected)
    if isinstance(value, int):
        bounds = (value, value)
    elif isinstance(value, str):
        low, _, high = value.partition(":")
        try:
            bounds = (int(low), int(high or low))
        except ValueError:
            raise bad(expected) from None
    elif isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        bounds = (value[0], value[1])
    else:
        raise bad(expected)
    if not 1 <= bounds[0] <= bounds[1]:
        raise bad(expected)
    return bounds


def _datasets(value: Any, bad, source: str) -> dict[str, str]:
    from batchdet.schema import check_dataset_name

    if not isinstance(value, dict) or not value:
        raise bad("a non-empty mapping of NAME: URL")
    out = {}
    for name, url in value.items():
        try:
            check_dataset_name(str(name))
        except ValueError as e:
            raise ConfigError(f"{source}: 'datasets': {e}") from None
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{source}: 'datasets': {name!r} must be a URL (text), got {_kind(url)}")
        out[str(name)] = url
    return out


def _options(value: Any, bad, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad("a mapping of KEY: VALUE")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{source}: 'storage_options': keys must be text, got {_kind(k)}")
        if isinstance(v, bool) or isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = str(v)  # as --storage-option KEY=VALUE would pass it
        else:
            raise ConfigError(f"{source}: 'storage_options': {k!r} must be text or true/false, got {_kind(v)}")
    return out


def _pin(model: str, sha256: str) -> str:
    from batchdet.distribution import model_ref, split_ref

    location, pinned = split_ref(model)
    if pinned and pinned != sha256:
        raise ConfigError(f"'model_sha256' {sha256} disagrees with the sha256 in 'model' ({pinned})")
    return model_ref(location, sha256)


# --- the command line: `batchdet detect --config FILE` ------------------------------
class _Unset:
    """Default of a detect flag not given on the command line (its real default inside)."""

    def __init__(self, default: Any):
        self.default = default

    def __repr__(self) -> str:
        return f"<unset: {self.default!r}>"


_RESTORE = "_config_restore"


def config_aware(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` (``batchdet detect``'s) tell flags given from flags
    left at their defaults, so :func:`apply_config` can let the file fill in
    only the latter. ``--dataset``/``--output`` stop being required at the
    argparse level: :func:`apply_config` requires them from either source."""
    restore: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        action.required = False
        if isinstance(action, argparse._AppendAction):
            restore[action.dest] = action.default  # argparse appends to a copy; None: not given
            action.default = None
        else:
            action.default = _Unset(action.default)
    parser.set_defaults(**{_RESTORE: restore})


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """``batchdet detect``'s parsed flags with ``--config FILE`` filled in
    where a flag was not given; raise ConfigError (one line) on a bad file or
    when neither gives ``--dataset``/``--output``."""
    values = vars(args).copy()
    restore = values.pop(_RESTORE, {})
    given = {dest for dest, v in values.items() if not isinstance(v, _Unset) and not (dest in restore and v is None)}
    out = {dest: (v.default if isinstance(v, _Unset) else v) for dest, v in values.items()}
    for dest, default in restore.items():
        if out.get(dest) is None:
            out[dest] = list(default) if isinstance(default, list) else default
    path = values.get("config")
    config = read_config(path) if path else {}
    for key, value in config.items():
        dest = DESTS.get(key, key)
        if key == "model_sha256":
            continue
        if dest not in values:
            raise ConfigError(f"{path}: {key!r} is not supported by this version of batchdet detect")
        if key == "storage_options":
            out[dest] = [f"{k}={_text(v)}" for k, v in value.items()] + list(out.get(dest) or [])
        elif dest in given:
            continue
        elif key == "datasets":
            out[dest] = [f"{name}={url}" for name, url in value.items()]
        elif key == "actors":
            out[dest] = f"{value[0]}:{value[1]}"
        elif key == "model":
            out[dest] = _pin(value, config["model_sha256"]) if "model_sha256" in config else value
        else:
            out[dest] = value
    missing = [flag for flag, dest in (("--dataset", "dataset"), ("--output", "output")) if not out.get(dest)]
    if missing:
        where = f" or in {path}" if path else " (or in a --config file)"
        raise ConfigError(f"the following arguments are required: {', '.join(missing)}{where}")
    return argparse.Namespace(**out)


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``batchdet detect`` flags (after :func:`apply_config`) → a job spec dict,
    validated by :func:`parse_config` (what ``batchdet submit`` ships)."""
    from batchdet.plan import parse_actors, parse_dataset
    from batchdet.storage import parse_storage_options

    values = vars(args)
    config: dict[str, Any] = {}
    datasets: dict[str, str] = {}
    for spec in values.get("dataset") or []:
        name, url = parse_dataset(spec)
        if name in datasets:
            raise ConfigError(f"dataset {name!r} given twice")
        datasets[name] = url
    config["datasets"] = datasets
    for key in SCHEMA:
        dest = DESTS.get(key, key)
        value = values.get(dest)
        if key in ("datasets", "model_sha256") or value is None:
            continue
        if key == "storage_options":
            value = parse_storage_options(value)
            if not value:
                continue
        elif key == "actors":
            value = list(parse_actors(value))
        config[key] = value
    return parse_config(config, "arguments")


def dump_config(config: dict[str, Any]) -> str:
    """A job spec as YAML text (tuples become lists)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)

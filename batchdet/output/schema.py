"""The Parquet schema users script against (see docs/output.md).

One row per input image; ``dataset`` is the Hive partition column, so it is
not stored inside the files but recovered from the ``dataset=<NAME>/``
directory by every reader (pyarrow, DuckDB, Spark).
"""

from __future__ import annotations

import re

import pyarrow as pa


DETECTION_TYPE = pa.struct(
    [
        ("label_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("x_min", pa.float32()),
        ("y_min", pa.float32()),
        ("x_max", pa.float32()),
        ("y_max", pa.float32()),
    ]
)

#: Columns written into each file (``dataset`` comes from the directory).
FILE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("detections", pa.list_(DETECTION_TYPE)),
        ("run_id", pa.string()),
    ]
)

#: The full row as readers see it.
SCHEMA = FILE_SCHEMA.append(pa.field("dataset", pa.string()))

STATUS_OK = "ok"
STATUS_ERROR = "error"

DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_dataset_name(name: str) -> str:
    """Return ``name`` if it is a legal dataset name, else raise ValueError.

    The pattern keeps every name inside its own ``dataset=<NAME>`` partition:
    no slashes, no ``..``-only names, nothing a shell or URL would reinterpret.
    """
    if not DATASET_NAME.fullmatch(name) or name in {".", ".."}:
        raise ValueError(
            f"bad dataset name {name!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"
        )
    return name

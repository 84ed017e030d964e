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
        # content identity (docs/output.md, "Content identity"): null in files
        # written before batchdet recorded it, which every reader still reads
        ("size", pa.int64()),
        ("sha256", pa.string()),
        ("version", pa.string()),
        ("copied_from", pa.string()),
    ]
)

#: The full row as readers see it.
SCHEMA = FILE_SCHEMA.append(pa.field("dataset", pa.string()))

STATUS_OK = "ok"
STATUS_ERROR = "error"
#: An image an earlier run had a row for that its dataset's listing no longer
#: holds (deleted or moved away): the row that makes the older one not current.
STATUS_MISSING = "missing"

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

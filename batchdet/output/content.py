"""Which bytes an output already has a result for, and where: the same bytes never run the model twice.

A row records the sha256 of the bytes it was computed from. Before a
``--resume`` the driver gathers every ``ok`` row's digest (superseded rows
too: an image deleted and later restored) into a
:class:`ContentIndex` (about 80 bytes an image: 80 MB for a million rows),
which every inference actor gets once through Ray's object store. An image
whose digest is in it — a moved, renamed or copied file, or an unchanged
file its listing could not vouch for — gets that row's detections copied
(:class:`RowReader`), not a model run. Every row of one output has the same
result settings (batchdet.output.settings), so a copy is what the model
would have produced.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchdet.output.layout import Output

#: What a copied row takes from its source: everything the model decided.
COPIED_COLUMNS = ("width", "height", "detections")


@dataclass(frozen=True)
class ContentIndex:
    """Digests of ``ok`` rows, sorted, with where each row is."""

    digests: np.ndarray  # hex sha256 as fixed-width bytes (dtype S64), sorted
    files: tuple[str, ...]  # committed data files, as the output's filesystem takes them
    file_ids: np.ndarray  # int32: index into files, per digest
    rows: np.ndarray  # int32: row within that file, per digest

    @classmethod
    def from_rows(cls, table: pa.Table, files: list[str]) -> "ContentIndex":
        """From columns ``sha256`` (hex, none null), ``file`` (index into ``files``)
        and ``row``; one source kept per digest."""
        digests = _fixed_width(table.column("sha256").combine_chunks(), 64)
        digests, first = np.unique(digests, return_index=True)  # sorted, one each
        return cls(digests, tuple(files), np.asarray(table.column("file"), dtype=np.int32)[first],
                   np.asarray(table.column("row"), dtype=np.int32)[first])

    def __len__(self) -> int:
        return len(self.digests)

    def find(self, sha256: str) -> tuple[str, int] | None:
        """(file, row) of an ``ok`` row computed from bytes with this digest, or None."""
        key = sha256.encode()
        i = int(np.searchsorted(self.digests, key))
        if i < len(self.digests) and self.digests[i] == key:
            return self.files[self.file_ids[i]], int(self.rows[i])
        return None


def _fixed_width(strings: pa.Array, width: int) -> np.ndarray:
    """An Arrow string array whose values all have ``width`` bytes, as a numpy
    ``S<width>`` array read straight from its buffer (no Python string each)."""
    offsets = np.frombuffer(strings.buffers()[1], np.int32)[strings.offset:strings.offset + len(strings) + 1]
    if len(strings) and not (np.diff(offsets) == width).all():
        raise ValueError(f"not every value has {width} bytes")
    data = np.frombuffer(strings.buffers()[2], np.uint8)[offsets[0]:offsets[0] + width * len(strings)]
    return data.view(f"S{width}").copy()


class RowReader:
    """Rows of committed data files (immutable once committed), the last few files kept."""

    def __init__(self, out: Output, keep: int = 4):
        self.out, self.keep = out, keep
        self._files: OrderedDict[str, pa.Table] = OrderedDict()

    def row(self, path: str, row: int) -> dict[str, Any]:
        """``uri``, ``width``, ``height`` and ``detections`` (an Arrow list scalar) of one row."""
        table = self._files.pop(path, None)
        if table is None:
            with self.out.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["uri", *COPIED_COLUMNS])
        self._files[path] = table
        while len(self._files) > self.keep:
            self._files.popitem(last=False)
        return {name: table.column(name)[row].as_py() if name == "uri" else table.column(name)[row]
                for name in ("uri", *COPIED_COLUMNS)}

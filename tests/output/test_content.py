"""The content index the actors copy from: every digest found at its file and
row, one source per digest, nothing found that is not there."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from batchdet.output.content import ContentIndex, RowReader
from batchdet.output.layout import Output
from batchdet.output.schema import FILE_SCHEMA
from helpers.outputs import det, ok_row


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_every_digest_is_found_where_it_is():
    n = 1000
    paths = [f"/out/dataset=a/{j:03d}.parquet" for j in range(-(-n // 64))]
    files = [paths[i // 64] for i in range(n)]
    table = pa.table({"sha256": [_sha(i % 700) for i in range(n)],  # 300 digests stand twice
                      "file": pa.array([i // 64 for i in range(n)], pa.int32()), "row": [i % 64 for i in range(n)]})
    index = ContentIndex.from_rows(table.slice(1).filter(pa.array([True] * (n - 1))), paths)  # an offset array too
    assert len(index) == 700 and index.files == tuple(paths)
    for i in range(1, n):
        file, row = index.find(_sha(i % 700))
        first = i % 700  # the kept source is one of the rows holding that digest
        assert (file, row) in {(files[j], j % 64) for j in (first, first + 700) if j < n}
    assert index.find(_sha(n)) is None and index.find("0" * 64) is None and index.find("f" * 64) is None


def test_row_reader_gives_the_stored_row(tmp_path):
    rows = [ok_row(f"/in/{i}.jpg", 10 + i, 20 + i, [det(1, 0.5 + i / 10, (1, 2, 3, 4))]) for i in range(3)]
    path = tmp_path / "dataset=a" / "r.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), path)
    reader = RowReader(Output(str(tmp_path)), keep=1)
    got = reader.row(str(path), 2)
    assert (got["uri"], got["width"].as_py(), got["height"].as_py()) == ("/in/2.jpg", 12, 22)
    assert got["detections"].as_py()[0]["score"] == pa.scalar(0.7, pa.float32()).as_py()

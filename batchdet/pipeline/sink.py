"""Where Ray Data puts a run's rows: the run's staging folder (output/layout.py; committed by writing.py)."""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
from ray.data import Datasink

from batchdet.output.layout import Output
from batchdet.pipeline.writing import stage_rows


class StagingSink(Datasink):
    """One Parquet file per dataset per write task (:func:`batchdet.pipeline.writing.stage_rows`).

    Ray Data hands each write at least ``rows_per_file`` rows (fewer at the
    end of a run). A file cut short by a killed task fails its Parquet footer
    check at commit and is dropped (writing.finish_run).
    """

    def __init__(self, output: str, storage_options: dict[str, Any], run_id: str, rows_per_file: int):
        self.output, self.storage_options = output, storage_options
        self.run_id, self.rows_per_file = run_id, rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WriteStaging"

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> None:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return
        stage_rows(Output(self.output, self.storage_options), self.run_id, pa.concat_tables(tables))

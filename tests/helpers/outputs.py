"""Synthetic batchdet outputs, written exactly as docs/output.md describes,
and the checks on real runs' outputs that several tests share.

The readers (query, summary, eval, draw) are tested against these instead of
a real run, so the tests need neither Ray nor a model, and every expected
number can be computed by hand from :func:`sample_rows`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from batchdet.model.labels import COCO_NAMES
from batchdet.output.layout import RUNS_DIR
from batchdet.output.schema import SCHEMA, STATUS_ERROR, STATUS_OK
from batchdet.storage import filesystem

RUN_A = "20250101T000000-aaaa"
RUN_B = "20250102T000000-bbbb"


def det(label_id: int, score: float, box: tuple[float, float, float, float]) -> dict[str, Any]:
    """One detection struct; the label name comes from the COCO map like the pipeline's."""
    x_min, y_min, x_max, y_max = box
    return {"label_id": label_id, "label": COCO_NAMES[label_id], "score": score,
            "x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


def ok_row(uri: str, width: int, height: int, dets: list[dict[str, Any]], run_id: str = RUN_A) -> dict[str, Any]:
    """An image that decoded; detections sorted by score, high first, as the contract says."""
    dets = sorted(dets, key=lambda d: -d["score"])
    return {"uri": uri, "width": width, "height": height, "status": STATUS_OK,
            "error": None, "detections": dets, "run_id": run_id}


def error_row(uri: str, error: str, run_id: str = RUN_A) -> dict[str, Any]:
    """An image that failed: null size and null detections."""
    return {"uri": uri, "width": None, "height": None, "status": STATUS_ERROR,
            "error": error, "detections": None, "run_id": run_id}


def sample_rows() -> dict[str, list[dict[str, Any]]]:
    """Three datasets with every case a reader must handle.

    ``street``: detections over and under 0.5, an empty list, an error row.
    ``2017``: a name DuckDB would otherwise read as an integer; a second run.
    ``nothing``: only images without detections (the ``detections`` view gets no row).
    """
    street = [
        ok_row("s3://photos/street/a.jpg", 640, 480, [
            det(1, 0.95, (10, 20, 110, 220)), det(1, 0.85, (200, 40, 260, 200)),
            det(3, 0.70, (300, 300, 500, 420)), det(3, 0.30, (0, 0, 50, 40)),
        ]),
        ok_row("s3://photos/street/b.jpg", 800, 600, [
            det(1, 0.60, (5, 5, 100, 300)), det(18, 0.90, (400, 350, 600, 590)),
            det(18, 0.20, (1, 1, 20, 20)),
        ]),
        ok_row("s3://photos/street/c.jpg", 320, 240, []),
        error_row("s3://photos/street/broken.jpg", "UnidentifiedImageError: cannot identify image file"),
    ]
    year = [
        ok_row("/data/2017/x.jpg", 1200, 900, [det(3, 0.99, (1, 2, 3, 4))], run_id=RUN_B),
        ok_row("/data/2017/y.jpg", 1200, 900, [det(62, 0.51, (10, 10, 40, 80))], run_id=RUN_B),
    ]
    nothing = [ok_row("/data/nothing/empty.png", 64, 64, []), ok_row("/data/nothing/empty2.png", 64, 48, [])]
    return {"street": street, "2017": year, "nothing": nothing}


def manifest(run_id: str, rows: dict[str, list[dict[str, Any]]], *, official: bool,
             started: str, finished: str, wall_s: float) -> dict[str, Any]:
    """A run manifest with the counts the pipeline would record for ``rows``."""
    datasets = {}
    for name, items in rows.items():
        ok = sum(r["status"] == STATUS_OK for r in items)
        datasets[name] = {
            "url": f"s3://photos/{name}/", "images_ok": ok, "images_error": len(items) - ok,
            "detections": sum(len(r["detections"] or []) for r in items),
            "wall_s": wall_s, "images_per_s": len(items) / wall_s,
        }
    images = sum(len(items) for items in rows.values())
    return {
        "run_id": run_id, "started": started, "finished": finished,
        "arguments": ["detect", "--storage-option", "secret=***"],
        "datasets": datasets,
        "model": {"path": "/models/resnet34-ssd1200.onnx" if official else "/models/standin-ssd1200.onnx",
                  "sha256": "b417a818" if official else "0123abcd", "official": official},
        "versions": {"batchdet": "0.1.0", "ray": "2.50.0", "onnxruntime": "1.22.0"},
        "wall_s": wall_s, "images_per_s": images / wall_s,
    }


def sample_manifests(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run A (official weights) wrote street and nothing; run B (stand-in) wrote 2017."""
    run_a = {k: v for k, v in rows.items() if k != "2017"}
    return [
        manifest(RUN_A, run_a, official=True, started="2025-01-01T00:00:00+00:00",
                 finished="2025-01-01T00:00:12+00:00", wall_s=12.0),
        manifest(RUN_B, {"2017": rows["2017"]}, official=False, started="2025-01-02T00:00:00+00:00",
                 finished="2025-01-02T00:00:08+00:00", wall_s=8.0),
    ]


def write_output(url: str, rows: dict[str, list[dict[str, Any]]], manifests: list[dict[str, Any]] = (),
                 storage_options: dict[str, Any] | None = None) -> None:
    """Write ``rows`` as Hive-partitioned Parquet under ``url`` plus ``_runs/<id>.json``.

    Each dataset is written in two halves, so partitions hold several files
    as they do after a real run.
    """
    fs, root = filesystem(url, storage_options)
    for half in (0, 1):
        part = [dict(r, dataset=name) for name, items in rows.items() for r in items[half::2]]
        if part:
            table = pa.Table.from_pylist(part, schema=SCHEMA)
            pq.write_to_dataset(table, root, partition_cols=["dataset"], filesystem=fs,
                                basename_template=f"part-{half}-{{i}}.parquet")
    if manifests:
        fs.makedirs(posixpath.join(root, RUNS_DIR), exist_ok=True)
    for m in manifests:
        with fs.open(posixpath.join(root, RUNS_DIR, f"{m['run_id']}.json"), "w") as f:
            json.dump(m, f)


def flat_detections(rows: dict[str, list[dict[str, Any]]]) -> list[tuple]:
    """What the ``detections`` view must hold, as sorted tuples in its column order."""
    out = []
    for name, items in rows.items():
        for r in items:
            for d in r["detections"] or []:
                floats = [f32(d[k]) for k in ("score", "x_min", "y_min", "x_max", "y_max")]
                out.append((name, r["uri"], r["width"], r["height"], r["run_id"], d["label_id"], d["label"], *floats))
    return sorted(out)


def f32(value: float) -> float:
    """``value`` as it reads back from a float32 column."""
    return float(np.float32(value))


@dataclass
class WrittenOutput:
    """An output written by :func:`write_output`, and how to reach it."""

    url: str
    storage_options: dict[str, Any] | None
    rows: dict[str, list[dict[str, Any]]]
    manifests: list[dict[str, Any]]

    @property
    def cli_storage(self) -> list[str]:
        """The ``--storage-option`` flags the CLI needs for this output."""
        return [f for k, v in (self.storage_options or {}).items() for f in ("--storage-option", f"{k}={v}")]


def output_url(request: pytest.FixtureRequest, tmp_path, name: str = "out") -> tuple[str, dict[str, Any] | None]:
    """A fresh output location: a local folder, or a prefix in a new moto bucket for ``s3``."""
    if request.param == "local":
        return str(tmp_path / name), None
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/{name}", s3.storage_options


def _write_sample(request: pytest.FixtureRequest, folder: Path) -> WrittenOutput:
    url, options = output_url(request, folder)
    rows = sample_rows()
    manifests = sample_manifests(rows)
    write_output(url, rows, manifests, options)
    return WrittenOutput(url, options, rows, manifests)


@pytest.fixture(scope="module", params=["local", "s3"])
def sample_output(request: pytest.FixtureRequest, tmp_path_factory) -> WrittenOutput:
    """:func:`sample_rows` and :func:`sample_manifests` written locally and to
    S3, once per module: its tests only read it (a test that adds files to it
    takes :func:`own_sample_output`)."""
    return _write_sample(request, tmp_path_factory.mktemp("sample"))


@pytest.fixture(params=["local", "s3"])
def own_sample_output(request: pytest.FixtureRequest, tmp_path) -> WrittenOutput:
    """:func:`sample_output` written for one test, which may change it."""
    return _write_sample(request, tmp_path)


# --- real runs' outputs --------------------------------------------------------------------------
def written_rows(out: Path) -> list[dict]:
    """The rows a run left in ``out`` (the columns the kill-and-resume checks need)."""
    return pads.dataset(str(out), format="parquet", partitioning="hive").to_table(
        columns=["uri", "status", "run_id", "dataset"]).to_pylist()


def assert_exactly_once(out: Path, folder: Path) -> None:
    """One ok row per good image, nothing duplicated, the broken file an error."""
    got = written_rows(out)
    ok = [r["uri"] for r in got if r["status"] == "ok"]
    good = sorted(str(p) for p in folder.glob("img*.jpg"))
    assert sorted(ok) == good, "lost or duplicated ok rows"
    assert str(folder / "broken.jpg") in {r["uri"] for r in got if r["status"] == "error"}

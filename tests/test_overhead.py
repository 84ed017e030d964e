"""benchmarks/overhead.py end to end on the near-free model, tiny sizes.

No timing is asserted (the machine is shared): the figures must follow from
the raw measurements the run recorded, and the near-free model must be a
conforming model whose rows the pipeline writes. The run is marked ``bench``
(``pytest -m bench``, which .ci/run runs once); the model's check is not.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--models", "nearfree", "--sizes", "nearfree=6,12",
         "--bare-images", "nearfree=4", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "marginal CPU ms per image by process role" in proc.stdout
    return json.loads(out.read_text()), out


def test_near_free_model_meets_the_interface(tmp_path, monkeypatch):
    from batchdet.model.spec import check_model
    from batchdet.pipeline.detector import Detector

    monkeypatch.syspath_prepend(str(BENCH.parent))
    from overhead import model_path

    model = model_path("nearfree", tmp_path)  # the file the benchmark's runs use
    assert check_model(model).kind_id == "other"
    from batchdet.model.labels import INDEX_TO_NAME

    dets = Detector(model, threads=1).detect_prepared(np.zeros((3, 1200, 1200), np.uint8), 640, 480).detections
    assert [d["label"] for d in dets] == [INDEX_TO_NAME[i] for i in (1, 3, 18)]  # by score: 0.9, 0.6, 0.3
    assert [d["x_min"] for d in dets] == pytest.approx([64, 128, 0], abs=0.1)


@pytest.mark.bench
def test_figures_follow_from_the_raw_measurements(run):
    results, out = run
    assert results["machine"]["cpu_model"] and results["commit"]
    r = results["models"]["nearfree"]
    a, b = r["pipeline"]
    assert (a["images"], b["images"]) == (6, 12)
    rates = [s["images"] / s["images_per_s"] for s in r["bare"]["segments"]]  # each segment's wall time
    assert all(s["images"] == 4 * s["processes"] and w > 0 for s, w in zip(r["bare"]["segments"], rates))
    bare = statistics.fmean(s["images_per_s"] for s in r["bare"]["segments"])
    marginal = 6 / (b["wall_s"] - a["wall_s"])
    assert math.isclose(r["marginal_images_per_s"], marginal) and math.isclose(r["marginal_vs_bare"], marginal / bare)
    assert math.isclose(r["whole_run_vs_bare"], 12 / b["wall_s"] / bare)
    u = r["start_up"]  # Ray's start, then the first images, inside the whole run; a bare loop's own start-up
    assert 0 < u["ray_start_s"] < u["first_done_s"] < b["wall_s"] and 0 < u["bare_start_up_s"] < 120
    assert math.isclose(r["whole_run_vs_bare_with_start_up"], (u["bare_start_up_s"] + 12 / bare) / b["wall_s"])
    for p in (a, b):  # the CPU by role is the CPU by process name, regrouped; every process counted once
        assert math.isclose(sum(p["cpu_s_by_role"].values()), sum(p["cpu_s_by_name"].values()))
        assert p["cpu_s_by_role"]["driver"] > 0 and p["cpu_s_by_role"]["inference"] > 0 and p["peak_memory_bytes"] > 1e8
    assert math.isclose(r["marginal_cpu_ms_per_image"], 1e3 * (b["cpu_s"] - a["cpu_s"]) / 6)
    assert math.isclose(r["added_cpu_ms_per_image"], r["marginal_cpu_ms_per_image"] - r["bare"]["cpu_ms_per_image"])
    work = out.parent / "overhead-work"
    per_image = [sum(f.stat().st_size for f in (work / f"distinct-{n}").iterdir()) / n for n in (6, 12)]
    assert math.isclose(r["object_store_mb_per_image"], max(per_image) / 1e6)
    assert r["targets"]["marginal_vs_bare"]["met"] == (r["marginal_vs_bare"] >= 0.5)


@pytest.mark.bench
def test_identity_cost_follows_from_its_passes(run):
    """Content identity's CPU per image is the median over passes of with - without, per stage;
    the target (2 %) is judged on its share of the bare path's CPU per image, the one of the
    pipeline's marginal CPU per image recorded beside it."""
    from batchdet.pipeline.run import images_per_block

    r = run[0]["models"]["nearfree"]
    i, p = r["identity"], r["identity"]["passes"]
    assert (i["images"], i["block"], i["rows_written"]) == (12, images_per_block(12, os.cpu_count()), 12)
    assert sorted(p) == ["read", "read_before", "write", "write_before"] and all(len(v) == 7 for v in p.values())
    for stage in ("read", "write"):
        assert math.isclose(i[f"{stage}_ms_per_image"],
                            statistics.median(a - b for a, b in zip(p[stage], p[f"{stage}_before"])))
    assert math.isclose(i["cpu_ms_per_image"], i["read_ms_per_image"] + i["write_ms_per_image"])
    assert math.isclose(i["share_of_marginal_cpu"], i["cpu_ms_per_image"] / r["marginal_cpu_ms_per_image"])
    assert math.isclose(r["identity_cost"], i["cpu_ms_per_image"] / r["bare"]["cpu_ms_per_image"])
    assert r["identity_cost"] == i["share_of_bare_cpu"]
    assert r["targets"]["identity_cost"] == {"target": "<= 0.02", "value": r["identity_cost"],
                                             "met": r["identity_cost"] <= 0.02}


@pytest.mark.bench
def test_the_read_without_identity_is_the_same_read_less_its_columns(run, tmp_path):
    """What the identity's read cost is timed against does the same work but the hash:
    the same bytes and errors, only size and sha256 missing."""
    import hashlib

    import pyarrow as pa

    from batchdet.pipeline.stages import read_batch

    sys.path.insert(0, str(BENCH.parent))
    from overhead import read_before_identity

    work = run[1].parent / "overhead-work" / "distinct-12"
    uris = [str(p) for p in sorted(work.iterdir())][:3] + [str(tmp_path / "absent.jpg")]
    batch = pa.table({"uri": uris})
    with_identity = read_batch(batch)
    assert read_before_identity(batch).equals(with_identity.drop_columns(["size", "sha256"]))
    data = [Path(u).read_bytes() for u in uris[:3]]
    assert with_identity.column("sha256").to_pylist() == [hashlib.sha256(d).hexdigest() for d in data] + [None]
    assert with_identity.column("error").to_pylist()[:3] == [None] * 3 and with_identity.column("error")[3].as_py()


@pytest.mark.bench
def test_every_image_is_inferred_not_copied(run):
    """The datasets repeat 48 pictures, every file with bytes of its own: the same
    picture decodes to the same pixels, and no row of a run is a copy of another's."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(BENCH.parent))
    from overhead import with_comment

    from batchdet.pipeline.preprocess import prepare

    work = run[1].parent / "overhead-work"
    data = sorted((work / "images").iterdir())[0].read_bytes()
    assert with_comment(data, "copy 1") != data
    assert np.array_equal(prepare(with_comment(data, "copy 1")).image, prepare(data).image)
    for n in (6, 12):
        rows = pq.read_table(sorted((work / f"out-{n}").glob("dataset=*/*.parquet")), partitioning=None)
        assert rows.num_rows == n and rows.column("status").to_pylist() == ["ok"] * n
        assert rows.column("copied_from").null_count == n and len(set(rows.column("sha256").to_pylist())) == n

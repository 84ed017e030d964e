"""benchmarks/overhead.py: its arithmetic on synthetic records (fast, in
the default run), the near-free model it times, and the script end to end on
that model at tiny sizes.

No timing is asserted (the machine is shared): the figures must follow from
the raw measurements the run recorded, and the near-free model must be a
conforming model whose rows the pipeline writes. The run is marked ``bench``
(``pytest -m bench``, which .ci/run runs once).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.benchmarks import run_script, script

overhead = script("overhead")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    stdout = run_script("overhead", "--quick", "--out", str(out))
    assert "marginal CPU ms per image, the driver and the rest" in stdout
    return json.loads(out.read_text()), out


def _segment(rate: float, cpu_ms: float, start_up: float, others: float = 0.0) -> dict:
    return {"images_per_s": rate, "cpu_ms_per_image": cpu_ms, "start_up_s": start_up, "others_cores": others}


def _run(images: int, wall: float, cpu: dict[str, float], peak: int, others: float = 0.0) -> dict:
    return {"images": images, "wall_s": wall, "images_per_s": images / wall, "ray_start_s": 5.0, "first_done_s": 12.0,
            "cpu_s": sum(cpu.values()), "cpu_s_by_role": cpu, "others_cores": others, "peak_memory_bytes": peak,
            "bytes_read_per_image": 100_000 * images / 100}


def test_model_figures_from_synthetic_runs():
    segments = [_segment(110.0, 9.0, 2.0), _segment(90.0, 11.0, 3.0, others=0.2)]
    runs = [_run(400, 20.0, {"driver": 2.0, "ray": 6.0}, 1000), _run(1600, 32.0, {"driver": 5.0, "ray": 21.0}, 1100,
                                                                       others=0.1)]
    res = overhead.summarize(segments, runs)
    assert res["bare"]["images_per_s"] == 100.0 and res["bare"]["cpu_ms_per_image"] == 10.0
    assert res["marginal_images_per_s"] == 100.0  # 1200 images in 12 s
    assert res["marginal_vs_bare"] == 1.0 and res["whole_run_vs_bare"] == 0.5  # 50 img/s over 100
    assert res["start_up"] == {"ray_start_s": 5.0, "first_done_s": 12.0, "bare_start_up_s": 2.5, "bare_whole_s": 18.5}
    assert res["whole_run_vs_bare_with_start_up"] == pytest.approx(18.5 / 32)
    assert res["marginal_cpu_ms_per_image"] == pytest.approx(15.0)  # 18 CPU s over 1200 images
    assert res["added_cpu_ms_per_image"] == pytest.approx(5.0)
    assert res["marginal_cpu_ms_by_role"] == pytest.approx({"driver": 2.5, "ray": 12.5})
    assert res["memory_growth"] == pytest.approx(0.1) and res["object_store_mb_per_image"] == 1.6
    assert res["others_cores"] == 0.2
    compared = overhead.compared_figures(segments, [_run(400, 20.0, {"ray": 8.0}, 1), _run(1600, 44.0, {"ray": 20.0}, 1)],
                                         res["marginal_images_per_s"])
    assert compared["marginal_images_per_s"] == 50.0 and compared["marginal_vs_bare"] == 0.5
    assert compared["this_vs_compared"] == 2.0 and compared["marginal_cpu_ms_per_image"] == 10.0


def test_identity_is_the_median_difference_of_its_passes():
    passes = {"read": [0.30, 0.25, 0.26], "read_before": [0.20, 0.18, 0.10],  # differences .10 .07 .16
              "write": [0.02, 0.03, 0.02], "write_before": [0.01, 0.01, 0.01]}  # .01 .02 .01
    fig = overhead.identity_figures(passes, bare_cpu_ms=10.0, marginal_cpu_ms=11.0)
    assert fig == pytest.approx({"read_ms_per_image": 0.10, "write_ms_per_image": 0.01, "cpu_ms_per_image": 0.11,
                                 "share_of_bare_cpu": 0.011, "share_of_marginal_cpu": 0.01})


def test_a_run_missing_rows_fails():
    record = {"wall_s": 10.0, "ray_start_s": 4.0, "progress": [(6.0, 2, None), (9.5, 4, 1.0)], "cpu_s": 5.0,
              "cpu_s_by_role": {"driver": 1.0, "ray": 4.0}, "others_cores": 0.0, "peak_memory_bytes": 1,
              "datasets": {"bench": {"images": 4}}}
    fig = overhead.run_figures(4, record, 400_000, "out")
    assert (fig["images_per_s"], fig["first_done_s"], fig["bytes_read_per_image"]) == (0.4, 6.0, 100_000)
    with pytest.raises(SystemExit):
        overhead.run_figures(5, record, 400_000, "out")


def test_near_free_model_meets_the_interface(tmp_path):
    from batchdet.model.spec import check_model
    from batchdet.pipeline.detector import Detector

    model = overhead.model_path("nearfree", tmp_path)  # the file the benchmark's runs use
    assert check_model(model).kind_id == "other"
    from batchdet.model.labels import INDEX_TO_NAME

    dets = Detector(model, threads=1).detect_prepared(np.zeros((1, 3, 1200, 1200), np.float32), 640, 480).detections
    assert [d["label"] for d in dets] == [INDEX_TO_NAME[i] for i in (1, 3, 18)]  # by score: 0.9, 0.6, 0.3
    assert [d["x_min"] for d in dets] == pytest.approx([64, 128, 0], abs=0.1)


@pytest.mark.bench
def test_figures_follow_from_the_raw_measurements(run):
    results, out = run
    assert results["machine"]["cpu_model"] and results["commit"] and results["detect_options"] == {"actors": [1, 1]}
    r = results["models"]["nearfree"]
    work = out.parent / "overhead-work"
    a, b = r["pipeline"]
    assert (a["images"], b["images"]) == (4, 8)
    for p in (a, b):  # each run's figures are its detect child's record
        record = json.loads((work / f"run-{p['images']}.json").read_text())
        assert p["wall_s"] == record["wall_s"] and p["cpu_s_by_role"] == record["cpu_s_by_role"]
        assert p["cpu_s_by_role"]["driver"] > 0 and p["cpu_s_by_role"]["ray"] > 0 and p["peak_memory_bytes"] > 1e8
        assert 0 < p["ray_start_s"] < p["first_done_s"] < p["wall_s"]
        assert p["bytes_read_per_image"] * p["images"] == sum(f.stat().st_size for f in
                                                              (work / f"distinct-{p['images']}").iterdir())
    assert all(s["images"] == 2 * s["processes"] for s in r["bare"]["segments"])
    assert r["bare"]["images_per_s"] == statistics.fmean(s["images_per_s"] for s in r["bare"]["segments"])
    assert r == {**r, **overhead.summarize(r["bare"]["segments"], r["pipeline"]), "others_cores": r["others_cores"],
                 "compared": None}
    marginal = r["marginal_vs_bare"]  # None where the larger run was not the slower (noise, at these sizes)
    assert r["targets"]["marginal_vs_bare"]["met"] == (None if marginal is None else marginal >= 0.5)


@pytest.mark.bench
def test_identity_cost_follows_from_its_passes(run):
    from batchdet.pipeline.run import images_per_block

    r = run[0]["models"]["nearfree"]
    i, p = r["identity"], r["identity"]["passes"]
    assert (i["images"], i["block"], i["rows_written"]) == (8, images_per_block(8, os.cpu_count()), 8)
    assert sorted(p) == ["read", "read_before", "write", "write_before"] and all(len(v) == 7 for v in p.values())
    assert i == {**i, **overhead.identity_figures(p, r["bare"]["cpu_ms_per_image"], r["marginal_cpu_ms_per_image"])}
    assert r["identity_cost"] == i["share_of_bare_cpu"]
    assert r["targets"]["identity_cost"]["met"] == (r["identity_cost"] <= 0.02)


@pytest.mark.bench
def test_the_read_without_identity_is_the_same_read_less_its_columns(run, tmp_path):
    """What the identity's read cost is timed against does the same work but the hash:
    the same bytes and errors, only size and sha256 missing."""
    import hashlib

    import pyarrow as pa

    from batchdet.pipeline.stages import read_batch

    work = run[1].parent / "overhead-work" / "distinct-8"
    uris = [str(p) for p in sorted(work.iterdir())][:3] + [str(tmp_path / "absent.jpg")]
    batch = pa.table({"uri": uris})
    with_identity = read_batch(batch)
    assert overhead.read_before_identity(batch).equals(with_identity.drop_columns(["size", "sha256"]))
    data = [Path(u).read_bytes() for u in uris[:3]]
    assert with_identity.column("sha256").to_pylist() == [hashlib.sha256(d).hexdigest() for d in data] + [None]
    assert with_identity.column("error").to_pylist()[:3] == [None] * 3 and with_identity.column("error")[3].as_py()


@pytest.mark.bench
def test_every_image_is_inferred_not_copied(run):
    """The datasets repeat 48 pictures, every file with bytes of its own: the same
    picture decodes to the same pixels, and no row of a run is a copy of another's."""
    import pyarrow.parquet as pq

    from batchdet.pipeline.preprocess import prepare

    work = run[1].parent / "overhead-work"
    data = sorted((work / "images").iterdir())[0].read_bytes()
    assert overhead.with_comment(data, "copy 1") != data
    assert np.array_equal(prepare(overhead.with_comment(data, "copy 1")).tensor, prepare(data).tensor)
    for n in (4, 8):
        rows = pq.read_table(sorted((work / f"out-{n}").glob("dataset=*/*.parquet")), partitioning=None)
        assert rows.num_rows == n and rows.column("status").to_pylist() == ["ok"] * n
        assert rows.column("copied_from").null_count == n and len(set(rows.column("sha256").to_pylist())) == n

"""benchmarks/overhead.py end to end on the near-free model, tiny sizes.

No timing is asserted (the machine is shared): the figures must follow from
the raw measurements the run recorded, and the near-free model must be a
conforming model whose rows the pipeline writes. The run is marked ``bench``
(``pytest -m bench``, which .ci/run runs once); the model's check is not.
"""

from __future__ import annotations

import json
import math
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
    per_image = [sum(f.stat().st_size for f in (work / f"dataset-{n}").iterdir()) / n for n in (6, 12)]
    assert math.isclose(r["object_store_mb_per_image"], max(per_image) / 1e6)
    assert r["targets"]["marginal_vs_bare"]["met"] == (r["marginal_vs_bare"] >= 0.5)

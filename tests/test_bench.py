"""The benchmark's --quick mode end to end: every field there, every value sane.

No timing is asserted: the machine is shared and the quick model is tiny.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bare onnxruntime (ceiling)" in proc.stdout and "targets:" in proc.stdout
    return out


@pytest.fixture(scope="module")
def results(results_path):
    return json.loads(results_path.read_text())


def test_quick_run_reports_every_field(results):
    assert set(results) >= {"machine", "config", "preprocess", "bare", "pipeline", "pipeline_marginal",
                            "memory", "object_store", "int8", "targets"}
    m = results["machine"]
    assert m["nproc"] >= 1 and m["cpu_model"] and m["onnxruntime"] and m["ray"]
    c = results["config"]
    assert c["quick"] is True and c["images"] == [3, 6] and c["image_size"] == [640, 480]
    assert c["channels_divisor"] == 16 and len(c["model_sha256"]) == 64

    b = results["bare"]
    assert _positive(b["images_per_s"]) and len(b["segments"]) == 3
    assert all(_positive(s["s_per_image"]) and s["foreign_cpu_cores"] >= 0 for s in b["segments"])

    assert [r["images"] for r in results["pipeline"]] == [3, 6]
    for run in results["pipeline"]:
        assert _positive(run["images_per_s"]) and _positive(run["ratio_to_bare"])
        tl = run["timeline"]  # the actors' own timestamps: one predict per image, one load per actor
        assert tl["predicts"] == run["images"] and tl["actors"] >= 1 and 0 < tl["steady_busy_fraction"] <= 1.01
        # the rate once running is at least the end-to-end one (no start-up in it)
        assert tl["steady_images_per_s"] > run["images_per_s"]
        assert math.isclose(run["steady_ratio_to_bare"], tl["steady_images_per_s"] / run["bare_images_per_s_adjacent"])
        assert run["datasets"]["bench"]["images_ok"] == run["images"]
        # driver, GCS, raylet and at least the inference actor's worker
        assert run["peak_processes"] >= 4 and run["memory_samples"] >= 1
        assert 100e6 < run["peak_memory_bytes"] < 20e9
        assert run["peak_rss_sum_bytes"] >= run["peak_memory_bytes"] * 0.9

    pre = results["preprocess"]
    for key in ("bare_decode_ms", "prepare_ms", "normalise_ms", "normalise_in_graph_ms", "normalise_mlperf_numpy_ms", "total_ms"):
        assert _positive(pre[key]), key
    assert pre["total_ms"] > pre["prepare_ms"] > pre["bare_decode_ms"] * 0.5
    assert math.isclose(pre["ratio_to_decode"], pre["total_ms"] / pre["bare_decode_ms"])

    mem = results["memory"]
    assert set(mem["peak_bytes"]) == {"3", "6"} and -0.9 < mem["growth"] < 5

    # 1200×1200×3 uint8 per image must cross to the actor, and little else
    assert 4.32e6 <= results["object_store"]["bytes_per_image"] < 5e6

    q = results["int8"]
    assert q["standin"] is True and Path(q["model"]).name.endswith(".int8.onnx")
    assert _positive(q["speedup"]) and _positive(q["int8_s_per_image"])
    k = q["kernel_ceiling"]
    assert _positive(k["fp32_ms"]) and _positive(k["int8_ms"]) and math.isclose(k["speedup"], k["fp32_ms"] / k["int8_ms"])

    t = results["targets"]
    assert set(t) == {"pipeline_vs_bare", "preprocess_vs_decode", "memory_growth",
                      "object_store_mb_per_image", "int8_speedup"}
    assert all(isinstance(v["met"], bool) and v["target"] for v in t.values())
    assert t["pipeline_vs_bare"]["value"] == results["pipeline"][-1]["steady_ratio_to_bare"]
    assert all(isinstance(v["reliable"], bool) and v["others_cores"] >= 0 for v in t.values())
    assert results["bare"]["nice"] == 15


def test_quick_run_writes_a_markdown_table(results_path):
    text = results_path.with_suffix(".md").read_text()
    assert text.startswith("| measure | value | note |") and "| pipeline_vs_bare >= 0.95 |" in text
    assert "onnxruntime" in text and "Command: `bench.py --quick" in text


def test_prefetch_cap_bounds_what_waits_in_the_object_store(tmp_path):
    """benchmarks/prefetch.py on a real local Ray: uncapped, Ray Data prepares
    more of 160 images ahead of a consumer (0.05 s an
    image) than the cap allows; with the pipeline's cap, what
    waits never exceeds the cap plus the block being made."""
    from batchdet.pipeline import PREPARE_BATCH

    out = tmp_path / "prefetch.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "prefetch.py"), "--images", "160", "--seconds", "0.05", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max prepared ahead" in proc.stdout
    uncapped, capped = json.loads(out.read_text())
    assert not uncapped["capped"] and capped["capped"]
    image_bytes = 3 * 1200 * 1200
    bound = capped["cap_bytes"] + PREPARE_BATCH * image_bytes
    assert capped["max_images_ahead"] * image_bytes <= bound < uncapped["max_images_ahead"] * image_bytes
    assert all(0 < r["consumer_busy"] <= 1.0 for r in (uncapped, capped))


def test_ray_presence_measures_the_bare_loop_alone_and_beside_ray(tmp_path):
    """benchmarks/ray_presence.py on a real embedded Ray: both loops run, the
    ratio is the one of the two rates."""
    out = tmp_path / "presence.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "ray_presence.py"), "--rounds", "2", "--images", "1",
         "--channels-divisor", "16", "--settle", "0.5", "--idle-workers", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["idle_workers"] == 2 and len(res["rounds"]) == 2
    for r in res["rounds"]:
        assert _positive(r["alone_images_per_s"]) and _positive(r["beside_ray_images_per_s"])
        assert math.isclose(r["ratio"], r["beside_ray_images_per_s"] / r["alone_images_per_s"])
    assert res["min_ratio"] <= res["median_ratio"] <= res["max_ratio"]
    assert "bare loop beside an idle Ray: median" in proc.stdout

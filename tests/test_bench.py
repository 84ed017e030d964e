"""The benchmarks' arithmetic, on synthetic records: every figure a script
derives from its raw measurements (ratios, marginal rates, per-image costs,
targets judged) against values worked out by hand here. Fast, in the
default run.

Then the quick modes of bench.py, preprocessing.py, int8.py, prefetch.py, fidelity.py,
ray_presence.py and session_options.py end to end (overhead.py's, scale.py's and
listing.py's are in their own tests): every field there and sane, a few
figures recomputed from what the run left on disk. No timing is asserted:
the machine is shared and the quick model is tiny. Those runs are marked
``bench``: deselected by the default ``pytest`` (pyproject's addopts), run
by ``pytest -m bench``, which .ci/run does once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.benchmarks import run_script, script

harness = script("harness")


def _holds(value: float | None, target: str) -> bool | None:
    """Whether ``value`` meets ``target`` ("op bound"); None when there is no value
    (e.g. no steady state: every block finished within the same half second)."""
    if value is None:
        return None
    op, bound = target.split()
    return {">=": value >= float(bound), "<=": value <= float(bound)}[op]


# --- harness ------------------------------------------------------------------------------------
def test_marginal_figures_are_differences_over_extra_images():
    small, large = {"images": 10, "wall_s": 30.0, "cpu_s": 50.0}, {"images": 40, "wall_s": 45.0, "cpu_s": 110.0}
    assert harness.marginal_rate(small, large) == 2.0  # 30 images in 15 s
    assert harness.marginal(small, large, "cpu_s") == 2.0  # 60 CPU s over 30 images
    assert harness.marginal_rate(small, {**large, "wall_s": 30.0}) is None  # the larger was not slower
    assert harness.growth(200.0, 250.0) == 0.25
    assert harness.grouped_marginal({"driver": 1.0, "ray": 4.0}, {"driver": 2.5, "ray": 10.0, "new": 3.0}, 3) == \
        {"driver": 0.5, "new": 1.0, "ray": 2.0}


def test_others_cores_is_the_rest_of_the_machine():
    assert harness.others_cores(busy_s=30.0, own_s=10.0, wall_s=10.0) == 2.0
    assert harness.others_cores(busy_s=5.0, own_s=10.0, wall_s=10.0) == 0.0  # never negative
    assert harness.others_cores(busy_s=5.0, own_s=0.0, wall_s=0.0) == 0.0


def test_progress_figures_from_the_polls():
    polls = [(5.0, 0, None), (6.0, 0, None), (7.5, 4, None), (8.5, 12, 8.0), (9.0, 20, 9.5)]
    assert harness.progress_figures(polls, wall_s=10.25) == {"first_done_s": 7.5, "steady_images_per_s": 9.5,
                                                             "tail_s": 1.25}
    assert harness.progress_figures([(5.0, 0, None)], 6.0) == {"first_done_s": None, "steady_images_per_s": None,
                                                                "tail_s": None}


def test_bare_path_figures_over_the_slowest_process():
    # two processes: (wall s, CPU s, images, start-up s)
    fig = harness.bare_path_figures([(4.0, 3.0, 10, 2.0), (5.0, 4.0, 10, 2.5)], busy_cores=2.0, wall_s=5.0)
    assert fig == {"processes": 2, "images": 20, "images_per_s": 4.0, "cpu_ms_per_image": 350.0, "start_up_s": 2.5,
                   "others_cores": pytest.approx(0.6)}  # 2 cores busy, 7 CPU s of ours over 5 s


def test_judge_says_met_missed_and_noisy():
    judged = harness.judge({"a": (">=", 0.9), "b": ("<=", 0.1), "c": (">=", 1.0)}, {"a": 0.95, "b": 0.2, "c": None},
                           {"a": 0.1, "b": 0.5, "c": 0.0})
    assert judged["a"] == {"value": 0.95, "target": ">= 0.9", "met": True, "others_cores": 0.1, "reliable": True}
    assert (judged["b"]["met"], judged["b"]["reliable"]) == (False, False)
    assert judged["c"]["met"] is None


# --- bench.py -----------------------------------------------------------------------------------
def _bare(rate: float, cpu: float, load: float = 0.0) -> dict:
    return {"images_per_s": rate, "cpu_s_per_image": cpu, "foreign_cpu_cores": load}


def _record(wall: float, cpu: float, peak: int, polls: list, load: float = 0.0) -> dict:
    """What harness.run_detect returns, cut to what bench.py reads."""
    return {"wall_s": wall, "cpu_s": cpu, "cpu_s_by_role": {"driver": 1.0, "ray": cpu - 1.0}, "ray_start_s": 4.0,
            "progress": polls, "process_wall_s": wall + 1, "peak_memory_bytes": peak, "peak_rss_sum_bytes": 2 * peak,
            "peak_processes": 9, "peak_memory_by_role": {}, "memory_samples": 3, "others_cores": load,
            "datasets": {"bench": {"images": 0}}}


def test_bench_figures_from_synthetic_runs():
    bench = script("bench")
    one, split = _bare(8.0, 0.2), _bare(10.0, 0.25, load=0.1)
    best = bench.better_layout(one, split)
    assert best["layout"] == "split" and best["images_per_s"] == 10.0 and best["one_session"] is one
    assert bench.better_layout(one, None)["layout"] == "one_session"
    # before, after 20, after 80: one session at 10, 8, 6 img/s (faster than the split layout but for the first)
    segments = [bench.better_layout(_bare(rate, 0.2, load), _bare(rate - 1, 0.3)) for rate, load in
                ((10.0, 0.1), (8.0, 0.2), (6.0, 0.3))]
    small = bench.pipeline_figures(20, _record(20.0, 8.0, 1000, [(10.0, 4, None), (19.0, 20, 2.0)]), 2_000_000)
    large = bench.pipeline_figures(80, _record(50.0, 20.0, 1200, [(10.0, 4, None), (49.0, 80, 2.4)], 0.4), 8_000_000)
    assert (small["images_per_s"], small["cpu_s_per_image"], small["object_store_bytes_per_image"]) == \
        (1.0, 0.4, 100_000)
    assert large["timeline"] == {"ray_start_s": 4.0, "first_done_s": 10.0, "steady_images_per_s": 2.4, "tail_s": 1.0}
    res = bench.summarize(segments, [small, large])
    assert res["bare"]["images_per_s"] == 8.0 and res["bare"]["spread"] == 0.5  # (10 - 6) / 8
    assert res["bare"]["s_per_image"] == 0.125 and res["bare"]["cpu_s_per_image"] == pytest.approx(0.2)
    # each run against the two bare segments either side of it: 9 and 7 img/s
    assert small["ratio_to_bare"] == pytest.approx(1 / 9) and large["ratio_to_bare"] == pytest.approx(1.6 / 7)
    assert small["steady_ratio_to_bare"] == pytest.approx(2 / 9) and large["steady_ratio_to_bare"] == pytest.approx(2.4 / 7)
    assert large["cpu_ratio_to_bare"] == pytest.approx(0.2 / 0.25)
    assert res["pipeline_marginal"] == {"from": 20, "to": 80, "images_per_s": 2.0, "ratio_to_bare": 0.25}  # 60 in 30 s
    assert res["memory"]["growth"] == pytest.approx(0.2)
    assert res["object_store"]["mb_per_image"] == 0.1
    values, loads = bench.target_inputs(res)
    assert values == {"pipeline_vs_bare": pytest.approx(2.4 / 7), "memory_growth": pytest.approx(0.2),
                      "object_store_mb_per_image": 0.1}
    assert loads == {"pipeline_vs_bare": 0.4, "memory_growth": 0.4, "object_store_mb_per_image": 0.0}
    rows = bench.rows({**res, "targets": {}})
    assert ("pipeline, marginal 20->80", "2.0000 img/s", "0.250 x bare (start-up cancelled)") in rows


def test_bench_passes_its_options_to_detect():
    bench = script("bench")
    args = bench.parse_args(["--quick", "--threads", "2", "--batch-size", "3"])
    assert bench.detect_options(args) == {"threads_per_actor": 2, "actors": [1, 1], "batch_size": 3}
    assert bench.detect_options(bench.parse_args(["--actors", "1:3"])) == {"actors": [1, 3]}


# --- error_rows.py ------------------------------------------------------------------------------
def test_error_rows_rate_by_fifth_is_each_fifths_rows_over_its_seconds():
    """The within-run rate that shows a cost growing with the run."""
    by_fifth = script("error_rows").by_fifth
    # blocks of 5 rows after 2 s of start-up: one every 0.25 s up to row 50, then one every 0.5 s;
    # polled every 0.05 s, as the progress line's rows (seconds, rows done)
    finished = [2 + 0.25 * k for k in range(1, 11)] + [4.5 + 0.5 * k for k in range(1, 11)]
    points = [(i * 0.05, 5 * sum(f <= i * 0.05 + 1e-9 for f in finished)) for i in range(0, 200)]
    rates = by_fifth(points, 100)
    assert rates[:2] == pytest.approx([20.0, 20.0], rel=0.05)  # start-up left out of the first fifth
    assert rates[3:] == pytest.approx([10.0, 10.0], rel=0.05) and 10 < rates[2] < 20


def test_error_rows_figures_and_target():
    error_rows = script("error_rows")
    polls = [(1.0, 0, None)] + [(1.0 + k, 10 * k, 10.0 if k > 1 else None) for k in range(1, 11)]  # 10 rows/s
    record = {"wall_s": 8.0, "progress": polls, "driver_rss_mb": 300.4, "files": 3,
              "datasets": {"missing": {"images": 100, "images_error": 100}}}
    fig = error_rows.size_figures(100, record)
    assert fig == {"n": 100, "wall_s": 8.0, "whole_rows_per_s": 12.5, "rows_per_s": 10.0,
                   "rows_per_s_by_fifth": [10.0] * 5, "driver_rss_mb": 300, "images": 100, "images_error": 100,
                   "files": 3}
    with pytest.raises(SystemExit):  # a row lost
        error_rows.size_figures(101, record)
    assert error_rows.rate_ratio([{"rows_per_s": 100.0}, {"rows_per_s": 85.0}]) == \
        {"rate_ratio_largest_to_smallest": 0.85, "target_rate_ratio": 0.9, "meets_target": False}
    assert error_rows.rate_ratio([{"rows_per_s": 0.0}, {"rows_per_s": 85.0}])["meets_target"] is False


# --- the others ---------------------------------------------------------------------------------
def test_int8_speedup_is_fp32_time_over_int8_time():
    assert script("int8").speedup([0.3, 0.5], [0.1, 0.3]) == {"images": 2, "fp32_s_per_image": 0.4,
                                                               "int8_s_per_image": 0.2, "speedup": 2.0}


def _detections(boxes, labels, scores) -> dict:
    return {"bboxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64),
            "scores": np.array(scores, np.float32)}


def test_precision_agreement_counts_fp32_detections_above_the_score_matched_by_label_and_iou():
    precision = script("precision")
    ref = _detections([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [50, 50, 60, 60]], [1, 2, 3, 4],
                      [0.9, 0.8, 0.7, 0.2])  # the last one is below 0.3: not wanted
    # box 1 moved by one unit along x: IoU 90/110 = 0.818 < 0.9; box 0 found by a box of IoU 0.9 (area 90 inside);
    # box 2's only overlap has another label
    got = _detections([[0, 0, 10, 9], [21, 20, 31, 30], [0, 0, 10, 10], [50, 50, 60, 60]], [1, 2, 4, 4],
                      [0.85, 0.8, 0.7, 0.2])
    assert precision.box_iou(ref["bboxes"][:1], got["bboxes"][:1])[0, 0] == pytest.approx(0.9)
    a = precision.agreement(ref, got)
    assert (a["wanted"], a["matched"]) == (3, 1) and a["max_score_diff"] == pytest.approx(0.05)
    assert a["max_box_diff_px"] == pytest.approx(1 * 1200)  # box 0's y_max moved by one unit of the normalised box
    same = {"wanted": 3, "matched": 3, "max_score_diff": 0.0, "max_box_diff_px": 0.0}
    assert precision.agreement(ref, ref) == same
    none = {"max_score_diff": None, "max_box_diff_px": None}
    assert precision.agreement(ref, _detections([], [], [])) == {"wanted": 3, "matched": 0, **none}
    assert precision.agreement(_detections([], [], []), ref) == {"wanted": 0, "matched": 0, **none}


def test_precision_lines_are_medians_over_fp32_and_pooled_agreement():
    precision = script("precision")
    agree = lambda wanted, matched, diff: {"wanted": wanted, "matched": matched, "max_score_diff": diff,  # noqa: E731
                                           "max_box_diff_px": diff and diff * 100}
    records = [
        {"engine": "onnxruntime", "precision": "fp32", "reason": None, "times": [2.0, 2.4, 2.2],
         "agreements": [agree(10, 10, 0.0), agree(6, 6, 0.0)]},
        {"engine": "openvino", "precision": "bf16", "reason": None, "times": [1.0, 1.2, 1.1],
         "agreements": [agree(10, 9, 0.02), agree(6, 3, 0.05)]},
        {"engine": "onnxruntime", "precision": "int8", "reason": "no INT8 copy (--int8 none)"},
        {"engine": "openvino", "precision": "int8", "reason": None, "times": [0.5], "agreements": [agree(0, 0, None)]},
    ]
    fp32, bf16, int8, ov_int8 = precision.summarise(records)
    assert fp32["speedup"] == 1.0 and fp32["agreement"] == 1.0 and fp32["s_per_image"] == 2.2
    assert bf16 == {"engine": "openvino", "precision": "bf16", "s_per_image": 1.1, "speedup": 2.0, "wanted": 16,
                    "matched": 12, "agreement": 0.75, "max_score_diff": 0.05, "max_box_diff_px": 5.0}
    assert int8 == {"engine": "onnxruntime", "precision": "int8", "reason": "no INT8 copy (--int8 none)"}
    assert ov_int8["speedup"] == 4.4 and ov_int8["agreement"] is None and ov_int8["max_score_diff"] is None
    table = precision.rows([fp32, bf16, int8])
    assert table[1][:2] == ("openvino bf16", "1.100 s/image") and "x2.00 fp32" in table[1][2]
    assert "agreement with fp32 75.0% of 16" in table[1][2] and table[2][2] == "not run: no INT8 copy (--int8 none)"


def test_preprocessing_ratio_is_prepare_over_decode():
    fig = script("preprocessing").preprocessing_figures(
        {"bare_decode": 0.004, "prepare": 0.006, "mlperf_route": 0.01}, [90_000, 100_000])
    assert fig == pytest.approx({"jpeg_kb_mean": 95.0, "bare_decode_ms": 4.0, "prepare_ms": 6.0,
                                 "mlperf_route_ms": 10.0, "ratio_to_decode": 1.5})


def test_ray_presence_ratios_per_round_then_their_median():
    res = script("ray_presence").presence_figures([
        {"alone_images_per_s": 10.0, "beside_ray_images_per_s": 9.0},
        {"alone_images_per_s": 8.0, "beside_ray_images_per_s": 8.0},
        {"alone_images_per_s": 5.0, "beside_ray_images_per_s": 4.0}])
    assert [r["ratio"] for r in res["rounds"]] == [0.9, 1.0, 0.8]
    assert (res["median_ratio"], res["min_ratio"], res["max_ratio"]) == (0.9, 0.8, 1.0)


def test_prefetch_read_ahead_and_consumer_busy():
    prefetch = script("prefetch")
    made = [0.0, 0.1, 0.2, 0.3, 2.0]
    starts = [0.5, 1.0, 1.5, 2.0, 2.5]  # at 0.5: 4 made, none started → 4 waiting
    assert prefetch.max_ahead(made, starts) == 4
    assert prefetch.max_ahead([0.0, 1.0], [0.5, 1.5]) == 1
    assert prefetch.busy(2.0, starts, [0.9, 1.4, 1.9, 2.4, 3.0]) == 0.8  # 2 s of work from 0.5 to 3.0


def test_listing_way_figures():
    assert script("listing").way_figures(10_000, 4.004, 11) == {"seconds": 4.0, "keys_per_s": 2498,
                                                                 "progress_reports": 11}


def test_session_options_relative_to_the_default_round_by_round():
    session_options = script("session_options")
    default = {"times": [1.0, 2.0, 1.0], "cpu": [2.0, 2.0, 2.0]}
    fig = session_options.relative_figures({"times": [0.5, 3.0, 1.2], "cpu": [1.0, 3.0, 2.0]}, default)
    # per round: times 0.5/1, 3/2, 1.2/1; CPU 1/2, 3/2, 2/2
    assert fig.pop("relative_time_range") == [0.5, 1.5]
    assert fig == pytest.approx({"s_per_image": 4.7 / 3, "cpu_s_per_image": 2.0, "relative_time": 1.2,
                                 "relative_cpu": 1.0})
    creation = session_options.creation_figures({"uncached": [2.0, 4.0], "cache miss": [3.0, 3.0],
                                                 "cache hit": [0.5, 1.0]})
    assert creation["uncached"] == {"times": [2.0, 4.0], "mean_s": 3.0, "min_s": 2.0}
    assert creation["hit_vs_uncached"] == 0.25


def _det(label: int, score: float, box: tuple[float, float, float, float]) -> dict:
    return {"label_id": label, "score": score, **dict(zip(("x_min", "y_min", "x_max", "y_max"), box))}


def test_photo_files_are_the_named_test_photos_or_a_folders(tmp_path):
    from tests.helpers.photos import REAL_PHOTOS

    files = harness.photo_files(None, REAL_PHOTOS, 3)
    assert [f.name for f in files] == list(REAL_PHOTOS[:3]) and all(f.is_file() for f in files)
    assert [f.name for f in harness.photo_files(None, script("precision").PHOTOS, 99)] == list(script("precision").PHOTOS)
    with pytest.raises(SystemExit, match="not in .*tests/photos: moon.png"):
        harness.photo_files(None, ("rocket.jpg", "moon.png"), 2)  # a missing name never shrinks the set
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert [f.name for f in harness.photo_files(str(tmp_path), REAL_PHOTOS, 5)] == ["a.JPG", "b.png"]


def test_fidelity_finds_reference_detections_by_label_box_and_score():
    fidelity = script("fidelity")
    reference = [_det(1, 0.9, (10, 10, 50, 50)),     # found: edges within 1 px, score within 1e-3
                 _det(3, 0.8, (100, 20, 140, 60)),   # batchdet's has another label
                 _det(18, 0.7, (0, 0, 30, 30)),      # batchdet's is 1.5 px off
                 _det(18, 0.6, (60, 60, 90, 90)),    # batchdet's score is 2e-3 off
                 _det(62, 0.55, (-4.0, 5, 80, 130))]  # strays outside: clipped to x_min 0, y_max 120, then found
    found = [_det(1, 0.9008, (11, 9, 50.5, 49)), _det(4, 0.8, (100, 20, 140, 60)), _det(18, 0.7, (0, 0, 31.5, 30)),
             _det(18, 0.602, (60, 60, 90, 90)), _det(62, 0.5501, (0.4, 5, 80, 120))]
    m = fidelity.match_image("a.jpg", reference, found, width=160, height=120)
    assert (m["reference"], m["found"]) == (5, 2)
    assert m["max_box_diff_px"] == 1.0 and m["max_score_diff"] == pytest.approx(8e-4)
    missed = [(u["label_id"], u["score"], u["reason"]) for u in m["unmatched"]]
    assert missed == [(3, 0.8, "label"), (18, 0.7, "box"), (18, 0.6, "score")]
    # each with batchdet's nearest by box, whatever its label
    assert [u["nearest"]["label_id"] for u in m["unmatched"]] == [4, 18, 18]
    assert [u["nearest"]["box_diff_px"] for u in m["unmatched"]] == [0.0, 1.5, 0.0]
    assert m["unmatched"][0]["box"] == [100, 20, 140, 60] and m["unmatched"][0]["uri"] == "a.jpg"
    # unclipped, the stray box's x_min would be 4.4 px off
    assert fidelity.clip_box(reference[4], 160, 120) == _det(62, 0.55, (0.0, 5, 80, 120))


def test_fidelity_matching_is_one_to_one_and_takes_the_closest():
    fidelity = script("fidelity")
    reference = [_det(5, 0.9, (0, 0, 10, 10)), _det(5, 0.9, (0, 0, 10, 10))]
    m = fidelity.match_image("b.png", reference, [_det(5, 0.9, (0.5, 0, 10, 10)), _det(5, 0.9, (0.2, 0, 10, 10))],
                             100, 100)
    assert m["found"] == 2 and m["max_box_diff_px"] == 0.5  # the first took the 0.2 px one, the second what is left
    alone = fidelity.match_image("b.png", reference, [_det(5, 0.9, (0, 0, 10, 10))], 100, 100)
    assert alone["found"] == 1 and alone["unmatched"][0]["nearest"]["box_diff_px"] == 0.0  # used, still the nearest
    empty = fidelity.match_image("c.png", reference[:1], [], 100, 100)
    assert empty["found"] == 0 and empty["unmatched"][0]["nearest"] is None and empty["max_box_diff_px"] is None


def test_fidelity_summary_pools_the_images():
    fidelity = script("fidelity")
    a = fidelity.match_image("a", [_det(1, 0.9, (0, 0, 10, 10))] * 3, [_det(1, 0.9, (0, 0, 10, 10.25))] * 2, 20, 20)
    b = fidelity.match_image("b", [_det(2, 0.8, (0, 0, 10, 10))], [_det(2, 0.8005, (0, 0, 10, 10))], 20, 20)
    none = fidelity.match_image("c", [], [_det(2, 0.8, (0, 0, 10, 10))], 20, 20)
    s = fidelity.summarise([a, b, none])
    assert {k: v for k, v in s.items() if k != "unmatched"} == {
        "images": 3, "reference_detections": 4, "found": 3, "agreement": 0.75, "max_box_diff_px": 0.25,
        "max_score_diff": pytest.approx(5e-4), "not_found_by_reason": {"score": 0, "box": 0, "label": 1}}
    assert [u["uri"] for u in s["unmatched"]] == ["a"]  # a's third: both label-1 boxes taken, so "label"
    assert fidelity.summarise([none])["agreement"] is None
    table = fidelity.rows(s)
    assert ("agreement", "75.00%", "found / reference detections") in table
    assert ("not found", "1", "0 score, 0 box, 1 label; listed below") in table
    assert table[-1][0] == "  a" and table[-1][2].startswith("label: ")
    assert "nearest: label 1 score 0.9000" in table[-1][2]


# --- quick runs ---------------------------------------------------------------------------------
def _quick(name: str, out: Path) -> dict:
    """``name --quick --out OUT``: its JSON, after checking it printed its targets."""
    assert "targets:" in run_script(name, "--quick", "--out", str(out))
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.bench
def test_bench_quick_run(tmp_path):
    out = tmp_path / "results.json"
    res = _quick("bench", out)
    assert res["machine"]["nproc"] >= 1 and res["machine"]["ray"] and res["commit"]
    c = res["config"]
    assert c["quick"] is True and c["images"] == [2, 4] and c["detect_options"] == {"actors": [1, 1]}
    assert c["channels_divisor"] == 16 and len(c["model_sha256"]) == 64
    assert len(res["bare"]["segments"]) == 3 and _positive(res["bare"]["images_per_s"]) and res["bare"]["nice"] == 15
    work = tmp_path / "work"  # bench.py's default --workdir beside --out
    for run in res["pipeline"]:
        n = run["images"]
        record = json.loads((work / f"pipeline-{n}.json").read_text())  # the detect child's own record
        assert run["datasets"]["bench"]["images_ok"] == n and record["wall_s"] == run["wall_s"]
        assert run["images_per_s"] == pytest.approx(n / record["wall_s"])
        assert record["cpu_s_by_role"]["driver"] > 0 and record["cpu_s_by_role"]["ray"] > 0
        assert run["cpu_s_per_image"] == pytest.approx(sum(record["cpu_s_by_role"].values()) / n)
        assert [done for _, done, _ in record["progress"]][-1] == n
        assert 0 < run["timeline"]["ray_start_s"] < run["timeline"]["first_done_s"] < run["wall_s"]
        assert run["peak_processes"] >= 4 and 100e6 < run["peak_memory_bytes"] < 20e9  # driver, GCS, raylet, actor
        files = harness.folder_bytes(work / f"dataset-{n}")
        assert run["object_store_bytes_per_image"] == files / n
    # 4 blocks of 1 image: a rate, unless they all finished within the half
    # second batchdet's own rate needs (a quiet machine), as its progress line says
    steady = res["pipeline"][-1]["timeline"]["steady_images_per_s"]
    assert steady is None or steady > res["pipeline"][-1]["images_per_s"] > 0
    for name, target in res["targets"].items():
        assert target["met"] == _holds(target["value"], target["target"]), name
    text = out.with_suffix(".md").read_text()
    assert text.startswith("| measure | value | note |") and "| pipeline_vs_bare >= 0.95 |" in text
    assert "Command: `bench.py --quick" in text


@pytest.mark.bench
def test_preprocessing_quick_run(tmp_path):
    res = _quick("preprocessing", tmp_path / "pre.json")
    pre = res["preprocess"]
    assert res["config"]["quick"] is True and pre["images"] == 3
    assert all(_positive(pre[k]) for k in ("bare_decode_ms", "prepare_ms", "mlperf_route_ms"))
    target = res["targets"]["preprocess_vs_decode"]
    assert target["value"] == pre["ratio_to_decode"] and target["met"] == _holds(target["value"], target["target"])


@pytest.mark.bench
def test_int8_quick_run(tmp_path):
    res = _quick("int8", tmp_path / "int8.json")
    q = res["int8"]
    assert q["standin"] is True and Path(q["model"]).name.endswith(".int8.onnx") and q["images"] == 1
    assert _positive(q["speedup"]) and _positive(q["kernel_ceiling"]["speedup"])
    assert isinstance(q["kernel_ceiling"]["vnni"], bool)
    target = res["targets"]["int8_speedup"]
    assert target["value"] == q["speedup"] and target["met"] == _holds(target["value"], target["target"])


@pytest.mark.bench
def test_precision_quick_run(tmp_path):
    res = _quick("precision", tmp_path / "precision.json")
    lines = {(line["engine"], line["precision"]): line for line in res["lines"]}
    assert set(lines) == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
                          ("openvino", "int8"), ("openvino", "bf16")}
    fp32 = lines["onnxruntime", "fp32"]
    assert fp32["speedup"] == 1.0 and fp32["agreement"] == 1.0 and fp32["max_score_diff"] == 0.0
    assert lines["openvino", "fp32"]["agreement"] >= 0.9  # the same arithmetic, another engine
    bf16 = lines["openvino", "bf16"]
    if "reason" in bf16:  # a CPU without bf16: listed, not run, and no target judged
        assert "AVX512_BF16" in bf16["reason"] and res["targets"]["bf16_speedup"]["met"] is None
    else:
        assert res["targets"]["bf16_speedup"]["value"] == bf16["speedup"]


@pytest.mark.bench
def test_prefetch_cap_bounds_what_waits_in_the_object_store(tmp_path):
    """benchmarks/prefetch.py on a real local Ray, 12 and 48 files of 8 MiB
    and a consumer taking 0.05 s a file: with the pipeline's cap, what waits
    never exceeds the cap plus a block from each read task running when it
    was reached. (That an uncapped run reads further ahead the larger the
    dataset shows at the script's own sizes, hundreds of files: too long here.)"""
    out = tmp_path / "prefetch.json"
    stdout = run_script("prefetch", "--images", "12,48", "--seconds", "0.05", "--kb", "8192", "--out", str(out),
                        cwd=tmp_path, timeout=300)
    assert "max read ahead" in stdout
    runs = json.loads(out.read_text())
    assert [(r["capped"], r["images"]) for r in runs] == [(False, 12), (False, 48), (True, 12), (True, 48)]
    for r in runs[2:]:
        file_bytes = r["kb_per_image"] * 1024
        assert r["max_images_ahead"] * file_bytes <= r["cap_bytes"] + r["read_tasks"] * r["block"] * file_bytes
    assert all(0 < r["max_images_ahead"] <= r["images"] and 0 < r["consumer_busy"] <= 1.0 for r in runs)


@pytest.mark.bench
def test_ray_presence_quick_run(tmp_path):
    out = tmp_path / "presence.json"
    stdout = run_script("ray_presence", "--rounds", "1", "--images", "1", "--channels-divisor", "16", "--settle", "0",
                        "--idle-workers", "1", "--out", str(out), "--workdir", str(tmp_path / "work"), cwd=tmp_path,
                        timeout=300)
    res = json.loads(out.read_text())
    (r,) = res["rounds"]
    assert res["idle_workers"] == 1 and _positive(r["alone_images_per_s"]) and _positive(r["beside_ray_images_per_s"])
    assert res["median_ratio"] == r["ratio"] == r["beside_ray_images_per_s"] / r["alone_images_per_s"]
    assert "bare loop beside an idle Ray: median" in stdout


@pytest.mark.bench
def test_session_options_quick_run(tmp_path):
    out = tmp_path / "session_options.json"
    stdout = run_script("session_options", "--channels-divisor", "16", "--rounds", "1", "--creation-rounds", "1",
                        "--variants", "1 thread", "--out", str(out), cwd=tmp_path)
    res = json.loads(out.read_text())
    assert list(res["variants"]) == ["default", "1 thread"] and res["variants"]["default"]["relative_time"] == 1.0
    assert all(_positive(res["creation"][m]["mean_s"]) for m in ("uncached", "cache miss", "cache hit"))
    assert "cache hit / uncached" in stdout


@pytest.mark.bench
def test_fidelity_quick_run(tmp_path):
    res = _quick("fidelity", tmp_path / "fidelity.json")
    c = res["config"]
    assert c["quick"] is True and c["channels_divisor"] == 16 and "smooth" in c["model_kind"]
    assert len(c["photos"]) == 3 == len(res["images"]) == res["summary"]["images"]
    images, s = res["images"], res["summary"]
    assert s["reference_detections"] == sum(m["reference"] for m in images) > 0
    assert s["found"] == sum(m["found"] for m in images) and s["agreement"] == s["found"] / s["reference_detections"]
    assert len(s["unmatched"]) == s["reference_detections"] - s["found"] == sum(s["not_found_by_reason"].values())
    assert s["max_box_diff_px"] is None or s["max_box_diff_px"] <= 1.0
    target = res["targets"]["agreement"]
    assert target["value"] == s["agreement"] and target["met"] == _holds(target["value"], target["target"])
    assert s["agreement"] == 1.0, s["unmatched"][:3]  # MLPerf's arithmetic, to float32's last bits

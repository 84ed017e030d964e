"""The benchmarks' --quick modes end to end (bench.py, preprocessing.py,
int8.py, prefetch.py, ray_presence.py): every field there, every value sane,
and every derived figure recomputed here from the raw timings the run recorded.

No timing is asserted: the machine is shared and the quick model is tiny.
The runs are marked ``bench``: deselected by the default ``pytest`` (pyproject's
addopts), run by ``pytest -m bench``, which .ci/run does once.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _quick(script: str, out: Path) -> dict:
    """``script --quick --out OUT``: its JSON, after checking it ran and printed its targets."""
    proc = subprocess.run([sys.executable, str(BENCH.parent / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets:" in proc.stdout
    return json.loads(out.read_text())


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


@pytest.mark.bench
def test_quick_run_reports_every_field(results):
    assert set(results) >= {"machine", "commit", "config", "bare", "pipeline", "pipeline_marginal",
                            "memory", "object_store", "targets"}
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
        assert 0 < tl["startup_s"] < run["wall_s"] and tl["tail_s"] >= 0 and tl["model_load_s"] > 0
        assert run["datasets"]["bench"]["images_ok"] == run["images"]
        # driver, GCS, raylet and at least the inference actor's worker
        assert run["peak_processes"] >= 4 and run["memory_samples"] >= 1
        assert 100e6 < run["peak_memory_bytes"] < 20e9
        assert run["peak_rss_sum_bytes"] >= run["peak_memory_bytes"] * 0.9

    mem = results["memory"]
    assert set(mem["peak_bytes"]) == {"3", "6"} and -0.9 < mem["growth"] < 5

    t = results["targets"]
    assert set(t) == {"pipeline_vs_bare", "memory_growth", "object_store_mb_per_image"}
    assert all(isinstance(v["met"], bool) and v["target"] for v in t.values())
    assert all(isinstance(v["reliable"], bool) and v["others_cores"] >= 0 for v in t.values())
    assert results["bare"]["nice"] == 15


def _raw_calls(folder: Path) -> dict[str, list[tuple[float, float]]]:
    """The actors' own call log, read here: bench.py's timer hook writes a
    line ``NAME START END`` (epoch seconds) per model load and per predict."""
    calls: dict[str, list[tuple[float, float]]] = {"load": [], "predict": []}
    files = sorted(folder.glob("calls-*.txt"))
    assert files, f"no call log in {folder}"
    for f in files:
        for line in f.read_text().splitlines():
            name, start, end = line.split()
            calls[name].append((float(start), float(end)))
    return calls


def _holds(value: float, target: str) -> bool:
    op, bound = target.split()
    return {">=": value >= float(bound), "<=": value <= float(bound)}[op]


@pytest.mark.bench
def test_quick_run_figures_follow_from_its_raw_timings(results, results_path):
    """Each derived figure against a computation of its own from what the
    run recorded raw: the actors' call logs, each bare segment's per-image
    times or wall time, the memory peaks and the operators' bytes."""
    work = results_path.parent / "work"  # bench.py's default --workdir beside --out
    # the ceiling: per segment the better layout's rate from its own timings, then their mean
    rates = []
    for seg in results["bare"]["segments"]:
        one, split = seg["one_session"], seg["split"]
        assert len(one["times"]) == one["images"] and all(x > 0 for x in one["times"])
        candidates = [len(one["times"]) / sum(one["times"])] + ([split["images"] / split["wall_s"]] if split else [])
        assert math.isclose(seg["images_per_s"], max(candidates), rel_tol=1e-9)
        rates.append(max(candidates))
    assert math.isclose(results["bare"]["images_per_s"], statistics.fmean(rates), rel_tol=1e-9)

    for i, run in enumerate(results["pipeline"]):
        calls = _raw_calls(work / f"pipeline-{run['images']}.calls")
        predicts, loads = calls["predict"], calls["load"]
        assert len(predicts) == run["images"] and len(loads) >= 1  # a predict per image, a load per actor
        ends = sorted(end for _, end in predicts)
        steady = (len(ends) - 1) / (ends[-1] - ends[0])  # results after the first over their span
        tl = run["timeline"]
        assert (tl["predicts"], tl["actors"]) == (len(predicts), len(loads))
        assert math.isclose(tl["steady_images_per_s"], steady, rel_tol=1e-6)
        busy = sum(end - start for start, end in predicts)
        assert math.isclose(tl["predict_s_per_image"], busy / len(predicts), rel_tol=1e-6)
        # the actors' work (their clocks) lies inside the run's wall time (the driver's)
        assert ends[-1] - min(start for start, _ in loads + predicts) <= run["wall_s"] <= run["process_wall_s"]
        adjacent = statistics.fmean(rates[i:i + 2])  # the bare segments just before and after this run
        assert math.isclose(run["ratio_to_bare"], run["images"] / run["wall_s"] / adjacent, rel_tol=1e-6)
        assert math.isclose(run["steady_ratio_to_bare"], steady / adjacent, rel_tol=1e-6)

    t = results["targets"]
    assert math.isclose(t["pipeline_vs_bare"]["value"], steady / adjacent, rel_tol=1e-6)  # the last run's
    peaks = [r["peak_memory_bytes"] for r in results["pipeline"]]
    assert math.isclose(t["memory_growth"]["value"], peaks[-1] / peaks[0] - 1, rel_tol=1e-9)
    per_image = [sum(o["bytes"] or 0 for o in r["operators"]) / r["images"] for r in results["pipeline"]]
    assert math.isclose(t["object_store_mb_per_image"]["value"], max(per_image) / 1e6, rel_tol=1e-9)
    # the encoded files cross to the actors (they decode), and little else: a
    # decoded 640×480 image alone would add 0.9 MB
    for run, through_store in zip(results["pipeline"], per_image):
        files = [f.stat().st_size for f in (work / f"dataset-{run['images']}").iterdir()]
        assert len(files) == run["images"] and statistics.fmean(files) <= through_store < statistics.fmean(files) + 0.3e6
    for name, target in t.items():  # "met" is the value against the target's own words
        assert target["met"] == _holds(target["value"], target["target"]), name


@pytest.mark.bench
def test_quick_run_writes_a_markdown_table(results_path):
    text = results_path.with_suffix(".md").read_text()
    assert text.startswith("| measure | value | note |") and "| pipeline_vs_bare >= 0.95 |" in text
    assert "onnxruntime" in text and "Command: `bench.py --quick" in text


@pytest.mark.bench
def test_preprocessing_against_a_bare_decode(tmp_path):
    res = _quick("preprocessing.py", tmp_path / "pre.json")
    pre = res["preprocess"]
    assert res["config"]["quick"] is True and pre["images"] == 3
    for key in ("bare_decode_ms", "prepare_ms", "normalise_ms", "normalise_in_graph_ms", "normalise_mlperf_numpy_ms", "total_ms"):
        assert _positive(pre[key]), key
    assert pre["total_ms"] > pre["prepare_ms"] > pre["bare_decode_ms"] * 0.5
    assert math.isclose(pre["total_ms"], pre["prepare_ms"] + pre["normalise_ms"], rel_tol=1e-9)
    target = res["targets"]["preprocess_vs_decode"]
    assert math.isclose(target["value"], pre["total_ms"] / pre["bare_decode_ms"], rel_tol=1e-9)
    assert target["met"] == _holds(target["value"], target["target"])


@pytest.mark.bench
def test_int8_against_fp32(tmp_path):
    res = _quick("int8.py", tmp_path / "int8.json")
    q = res["int8"]
    assert q["standin"] is True and Path(q["model"]).name.endswith(".int8.onnx") and q["images"] == 1
    assert _positive(q["speedup"]) and _positive(q["int8_s_per_image"]) and _positive(q["fp32_s_per_image"])
    k = q["kernel_ceiling"]
    assert _positive(k["fp32_ms"]) and _positive(k["int8_ms"]) and _positive(k["speedup"]) and isinstance(k["vnni"], bool)
    target = res["targets"]["int8_speedup"]
    assert math.isclose(target["value"], q["fp32_s_per_image"] / q["int8_s_per_image"], rel_tol=1e-9)
    assert target["met"] == _holds(target["value"], target["target"])


@pytest.mark.bench
def test_prefetch_cap_bounds_what_waits_in_the_object_store(tmp_path):
    """benchmarks/prefetch.py on a real local Ray, files of 2 MiB and a
    consumer taking 0.01 s a file: with the pipeline's cap, what waits never
    exceeds the cap plus a block from each read task running when it was
    reached, at 200 files and at 800; uncapped, it grows with the dataset
    past what the cap allows."""
    out = tmp_path / "prefetch.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "prefetch.py"), "--images", "200,800", "--seconds", "0.01",
         "--kb", "2048", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max read ahead" in proc.stdout
    runs = json.loads(out.read_text())
    assert [(r["capped"], r["images"]) for r in runs] == [(False, 200), (False, 800), (True, 200), (True, 800)]
    small, large = runs[:2]
    for r in runs[2:]:
        file_bytes = r["kb_per_image"] * 1024
        assert r["max_images_ahead"] * file_bytes <= r["cap_bytes"] + r["read_tasks"] * r["block"] * file_bytes
    assert large["max_images_ahead"] > small["max_images_ahead"]  # uncapped: grows with the dataset
    assert large["max_images_ahead"] > runs[3]["max_images_ahead"]
    assert all(0 < r["consumer_busy"] <= 1.0 for r in runs)


@pytest.mark.bench
def test_ray_presence_measures_the_bare_loop_alone_and_beside_ray(tmp_path):
    """benchmarks/ray_presence.py on a real embedded Ray: both loops run, the
    ratio is the one of the two rates."""
    out = tmp_path / "presence.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "ray_presence.py"), "--rounds", "2", "--images", "1",
         "--channels-divisor", "16", "--settle", "0.5", "--idle-workers", "2", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["idle_workers"] == 2 and len(res["rounds"]) == 2
    ratios = []
    for r in res["rounds"]:  # the raw rates, and from them the ratios the summary is made of
        assert _positive(r["alone_images_per_s"]) and _positive(r["beside_ray_images_per_s"])
        ratios.append(r["beside_ray_images_per_s"] / r["alone_images_per_s"])
    assert [r["ratio"] for r in res["rounds"]] == pytest.approx(ratios, rel=1e-9)
    assert (res["min_ratio"], res["median_ratio"], res["max_ratio"]) == pytest.approx(
        (min(ratios), statistics.median(ratios), max(ratios)), rel=1e-9)
    assert "bare loop beside an idle Ray: median" in proc.stdout


def test_operator_figures_are_read_from_dataset_stats(monkeypatch):
    """bench.py reads the bytes through the object store from the text of
    Ray Data's public ``Dataset.stats()``: operators, sub-operators, units."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from bench import operator_stats

    text = """Operator 1 ListFiles->MapBatches(read_batch): 2 tasks executed, 2 blocks produced in 1.2s
* Remote wall time: 16.29us min, 7.29ms max, 1.21ms mean, 24.17ms total
* Output num rows per block: 1 min, 2 max, 1 mean, 3 total
* Output size bytes per block: 100 min, 200 max, 150 mean, 300 total

Operator 2 Write: executed in 2.5s

\tSuboperator 0 MapBatches(InferenceStage): 3 tasks executed, 3 blocks produced in 2.1s
\t* Remote wall time: 1.5s min, 2.5s max, 2.0s mean, 4.0s total
\t* Output num rows per block: 1 min, 1 max, 1 mean, 3 total
\t* Output size bytes per block: 5 min, 9 max, 7 mean, 21 total
"""
    assert operator_stats(text) == [
        {"name": "ListFiles->MapBatches(read_batch)", "rows": 3, "bytes": 300, "wall_s": pytest.approx(0.02417)},
        {"name": "MapBatches(InferenceStage)", "rows": 3, "bytes": 21, "wall_s": 4.0},
    ]


def test_error_rows_rate_by_fifth_is_each_fifths_rows_over_its_seconds(monkeypatch):
    """benchmarks/error_rows.py: the within-run rate that shows a cost growing with the run."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from error_rows import by_fifth

    # blocks of 5 rows after 2 s of start-up: one every 0.25 s up to row 50, then one every 0.5 s;
    # polled every 0.05 s, as the progress line's rows (seconds, rows done)
    finished = [2 + 0.25 * k for k in range(1, 11)] + [4.5 + 0.5 * k for k in range(1, 11)]
    points = [(i * 0.05, 5 * sum(f <= i * 0.05 + 1e-9 for f in finished)) for i in range(0, 200)]
    rates = by_fifth(points, 100)
    assert rates[:2] == pytest.approx([20.0, 20.0], rel=0.05)  # start-up left out of the first fifth
    assert rates[3:] == pytest.approx([10.0, 10.0], rel=0.05) and 10 < rates[2] < 20

"""benchmarks/small_runs.py: its arithmetic on synthetic records, and its
quick mode end to end (marked ``bench``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import small_runs  # noqa: E402  (a script, not a package)


def test_breakdown_splits_a_process_at_its_manifest_timings():
    timings = {"start": 1000.0, "planned": 0.8, "prepared": 0.9, "engine_up": 5.9, "model_loaded": 9.9,
               "first_result": 10.4, "processed": 12.4}
    assert small_runs.breakdown(999.0, 1014.0, timings) == {
        "imports": 1.0, "planning": 0.8, "preparing": 0.1, "engine start": 5.0, "model load": 4.0,
        "first result": 0.5, "other images": 2.0, "commit and exit": 1.6}
    in_process = {"start": 1000.0, "planned": 0.8, "prepared": 0.9, "model_loaded": 1.4, "first_result": 2.4,
                  "processed": 2.4}
    steps = small_runs.breakdown(999.5, 1003.0, in_process)
    assert steps["engine start"] == 0.0 and steps["model load"] == 0.5 and steps["other images"] == 0.0
    assert steps["commit and exit"] == 0.6 and sum(steps.values()) == pytest.approx(3.5)


def _record(kind: str, images: int, bare: float, in_process: float, ray: float) -> dict:
    return {"model": kind, "images": images, "bare_s": bare,
            "in-process": {"wall_s": in_process, "steps": {}}, "ray": {"wall_s": ray, "steps": {}}}


def test_ratios_and_targets_judge_the_in_process_path_by_its_worst_round():
    assert small_runs.ratios(_record("fp32", 1, 4.0, 5.0, 16.0)) == {
        "in-process ratio": 0.8, "in-process extra_s": 1.0, "ray ratio": 0.25, "ray extra_s": 12.0}
    results = [_record("fp32", 1, 4.0, 5.0, 16.0), _record("fp32", 1, 4.0, 7.5, 16.0),  # two rounds
               _record("fp32", 24, 90.0, 95.0, 110.0), _record("int8", 24, 20.0, 26.0, 40.0)]
    results[1]["others_cores"] = 0.8  # the second round shared the machine
    judged = small_runs.judge(results)
    assert judged["1-image extra seconds over bare (fp32)"] == {
        "value": 3.5, "target": "<= 3.0", "met": False, "others_cores": 0.8, "reliable": False}
    assert judged["24-image bare / batchdet (fp32)"] == {
        "value": 0.947, "target": ">= 0.9", "met": True, "others_cores": 0.0, "reliable": True}
    assert judged["24-image bare / batchdet (int8)"]["value"] == 0.769
    assert judged["24-image bare / batchdet (int8)"]["met"] is False
    assert small_runs.judge(results[:1])["24-image bare / batchdet (int8)"]["met"] is None


@pytest.mark.bench
def test_quick_mode_runs_both_paths_and_the_bare_script(tmp_path):
    out = tmp_path / "small.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "small_runs.py"), "--quick", "--workdir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["model"], r["images"]) for r in res["results"]] == [("fp32", 1), ("fp32", 2)]
    for r in res["results"]:
        for execution in small_runs.EXECUTIONS:
            steps = r[execution]["steps"]
            assert sum(steps.values()) == pytest.approx(r[execution]["wall_s"], abs=0.01)
            assert (steps["engine start"] > 0) == (execution == "ray") and steps["model load"] > 0
    assert res["machine"]["cpu_flags"] is not None and res["commit"]

"""The README's first commands as a newcomer types them: the installed
`batchdet` console script, run from a fresh folder, with a model cache of its
own. Values are checked, not only exit codes.

`batchdet model standin --channels-divisor 8` puts the narrow stand-in where
`batchdet demo` looks for a stand-in (the model cache), so the demo runs the
whole job on it in seconds instead of building the full one. As a
newcomer's, the demo has no Ray to join: its 10 images run in-process.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

BATCHDET = Path(sys.executable).with_name("batchdet")  # what `pip install -e .` put beside python


def batchdet(*args: str, cwd: Path, cache: Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    assert BATCHDET.is_file(), f"{BATCHDET}: the console script is missing; run `python -m pip install -e .`"
    proc = subprocess.run([str(BATCHDET), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ if env is None else env, XDG_CACHE_HOME=str(cache)))
    assert proc.returncode == 0, f"batchdet {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """(a fresh folder to work in, its model cache, the narrow stand-in `model standin` wrote)."""
    home = tmp_path_factory.mktemp("newcomer")
    folder, cache = home / "clone", home / "cache"
    folder.mkdir()
    out = batchdet("model", "standin", "--channels-divisor", "8", cwd=folder, cache=cache)
    model = cache / "batchdet" / "standin-ssd1200.onnx"  # the default destination: the model cache, per XDG
    assert f"stand-in written: {model}" in out and "random weights" in out
    assert model.is_file() and not any(folder.iterdir())  # nothing in the folder it was run from
    return folder, cache, model


def test_model_standin_writes_a_model_that_info_calls_a_standin(newcomer):
    folder, cache, model = newcomer
    out = batchdet("model", "info", str(model), cwd=folder, cache=cache)
    fields: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("!!"):
            fields.setdefault(key.strip(), []).append(value.strip())
    assert fields["sha256"] == [hashlib.sha256(model.read_bytes()).hexdigest()]
    assert fields["size"] == [f"{model.stat().st_size:,} bytes"]
    assert "STAND-IN" in fields["kind"][0] and fields["official"] == ["no"]
    assert "batchdet.channels_divisor = 8" in fields["metadata"] and "batchdet.seed = 0" in fields["metadata"]
    assert fields["input"][0].startswith("image [1, 3, 1200, 1200] float32")
    assert {o.split()[0] for o in fields["output"]} == {"bboxes", "labels", "scores"}
    assert "STAND-IN MODEL" in out  # the loud warning


def test_demo_runs_the_whole_job_on_the_standin(newcomer):
    folder, cache, model = newcomer
    out = batchdet("demo", cwd=folder, cache=cache, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert "images/s (in-process)" in out
    root = folder / "batchdet-demo-output"  # the README's default output, beside where it was run
    assert sorted(p.name for p in folder.iterdir()) == ["batchdet-demo-output"]

    # it used the stand-in `model standin` made (not a new full-size one), and says so
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert "building the stand-in" not in out and "STAND-IN MODEL" in out
    assert re.search(rf"^\s*model: STAND-IN.*sha256 {sha[:12]}", out, re.M), out
    [run_id] = re.findall(rf"^run (\S+) -> {re.escape(str(root / 'output'))}$", out, re.M)

    # one Parquet row for every picture it drew, the broken one an error row
    images = {(d.name, f.name) for d in (root / "images").iterdir() for f in d.iterdir()}
    assert {name for name, _ in images} == {"street", "indoor"} and ("street", "street-broken.jpg") in images
    rows = pads.dataset(root / "output", format="parquet", partitioning="hive").to_table().to_pylist()
    assert sorted((r["dataset"], Path(r["uri"]).name) for r in rows) == sorted(images)
    assert {r["run_id"] for r in rows} == {run_id}
    for r in rows:
        if Path(r["uri"]).name == "street-broken.jpg":
            assert r["status"] == "error" and r["error"] and not r["detections"]
        else:
            assert r["status"] == "ok" and r["error"] is None and (r["width"], r["height"]) == (640, 480)
            assert all(0 <= d["x_min"] <= d["x_max"] <= 640 and 0 <= d["y_min"] <= d["y_max"] <= 480
                       for d in r["detections"])

    # the summary it printed is what the files hold
    for name in ("street", "indoor"):
        mine = [r for r in rows if r["dataset"] == name]
        ok = sum(r["status"] == "ok" for r in mine)
        expected = [len(mine), ok, len(mine) - ok, sum(len(r["detections"] or []) for r in mine)]
        printed = re.search(rf"^\s+{name}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
        assert printed and [int(x) for x in printed.groups()] == expected, out
    assert f'batchdet query {root / "output"} "SELECT' in out

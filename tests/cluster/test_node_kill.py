"""A worker node SIGKILLed mid-run on a real multi-node Ray cluster, then
--resume: every image ends with exactly one ok row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.outputs import assert_exactly_once


@pytest.mark.slow
@pytest.mark.breaks_cluster
def test_worker_node_killed_then_resumed(cluster, narrow_model, many_images, tmp_path):
    """On the session's cluster (a head of 1 CPU, a worker of 2): the worker
    dies with its actors. The test runs after the others that use the
    cluster (a later one would get the worker started again)."""
    out = tmp_path / "out"
    env = cluster.node_env(tmp_path / "driver-cache")
    argv = [sys.executable, "-m", "batchdet.cli", "detect", "--dataset", f"many={many_images}",
            "--output", str(out), "--model", str(narrow_model), "--address", f"127.0.0.1:{cluster.gcs_port}",
            "--rows-per-file", "2", "--batch-size", "1", "--threads-per-actor", "1", "--actors", "1:3"]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("_staging/*/dataset=many/*.parquet"))) < 2:
        assert driver.poll() is None, "the run finished before a node could be killed"
        time.sleep(0.05)
    victim = cluster.nodes[1]  # the worker: its raylet, object store and every process in its group
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    try:
        driver.wait(timeout=300)  # Ray may finish the run on the surviving nodes, or give up
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()

    # what is checked is what the killed node's run left, which the resume's plan reads and recovers:
    # the resume runs in its own process, without a driver's and an actor's start on the cluster
    resumed = subprocess.run([*argv, "--resume", "--execution", "in-process"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_exactly_once(out, many_images)
    assert not list(out.glob("_staging/*"))
    assert len(list(out.glob("_runs/*.json"))) >= 2  # the resumed run, and the first (committed or recovered)

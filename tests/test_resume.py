"""Nothing lost: kills mid-run (driver, inference actor), then --resume; the
refusal to write over results; --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from batchdet.api import detect
from batchdet.cli import main
from conftest import N_IMAGES
from helpers.outputs import assert_exactly_once, written_rows
from helpers.photos import photo


def test_driver_killed_then_resumed(narrow_model, many_images, tmp_path, ray_local, execution):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchdet.cli", "detect", "--dataset", f"many={many_images}", "--output", str(out),
         "--model", str(narrow_model), "--rows-per-file", "2", "--batch-size", "1", "--actors", "1",
         "--execution", execution],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=ray_local.env(),  # through Ray: joins the session's (the engine's kill, not Ray's start, is tested)
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("_staging/*/dataset=many/*.parquet"))) < 2:
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, mid-run, as a dying machine would
    proc.wait()
    staged = list(out.glob("_staging/*"))
    assert len(staged) == 1 and not list(out.glob("_runs/*.json"))
    killed_run = staged[0].name

    # an output holding a killed run's work is not silently written over
    assert main(["detect", "--dataset", f"many={many_images}", "--output", str(out),
                 "--model", str(narrow_model)]) == 2

    result = detect({"many": str(many_images)}, str(out), model=narrow_model, resume=True, execution=execution)
    assert_exactly_once(out, many_images)
    recovered = json.loads((out / "_runs" / f"{killed_run}.json").read_text())
    assert recovered["recovered"] is True and recovered["datasets"]["many"]["images"] >= 2
    assert result.datasets["many"].already_done == recovered["datasets"]["many"]["images_ok"]
    assert result.datasets["many"].images == N_IMAGES + 1 - result.datasets["many"].already_done
    assert not list(out.glob("_staging/*"))

    # resuming a finished output does nothing but retry the error row (the plan's choice: either engine's)
    again = detect({"many": str(many_images)}, str(out), model=narrow_model, resume=True, execution="in-process")
    assert again.datasets["many"].images == 1 and again.datasets["many"].images_error == 1
    assert_exactly_once(out, many_images)


def test_inference_actor_killed_mid_run(narrow_model, many_images, tmp_path, ray_local):
    """Ray restarts the killed actor and retries its batch; no row is lost or doubled."""
    from ray._private.state import state  # this Ray's own actor table (others may run beside it)

    killed: list[int] = []

    def kill_first_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for actor in state.actor_table(None).values():
                if "MapWorker" in actor["ActorClassName"] and actor["State"] == "ALIVE" and actor["Pid"]:
                    time.sleep(1.0)  # let it start on its batches
                    os.kill(actor["Pid"], signal.SIGKILL)
                    killed.append(actor["Pid"])
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_first_actor)
    killer.start()
    result = detect({"many": str(many_images)}, str(tmp_path / "out"), model=narrow_model, batch_size=1)
    killer.join()
    assert killed, "no inference actor was found to kill"
    assert result.datasets["many"].images == N_IMAGES + 1
    assert_exactly_once(tmp_path / "out", many_images)


def test_refuse_then_overwrite(narrow_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo("rocket.jpg"))
    out = tmp_path / "out"
    first = detect({"x": str(folder)}, str(out), model=narrow_model, execution="in-process")
    argv = ["detect", "--dataset", f"x={folder}", "--output", str(out), "--model", str(narrow_model),
            "--execution", "in-process"]
    assert main(argv) == 2
    assert "already holds batchdet results" in capsys.readouterr().err
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert main([*argv, "--overwrite"]) == 0
    got = written_rows(out)
    assert len(got) == 1 and got[0]["run_id"] != first.run_id
    assert not (out / "_runs" / f"{first.run_id}.json").exists()

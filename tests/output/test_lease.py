"""One writer per output: the lease (batchdet/output/lease.py), locally and on S3.

Unit tests take and inspect leases without Ray; the others put two real
processes on one output: a second run (``--resume``, ``--overwrite``) is
refused with one line while the first works, and succeeds once the first
has finished or has stopped heartbeating (its staged rows then recovered).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from batchdet.api import detect
from batchdet.cli import main
from batchdet.output import lease as leasing
from batchdet.output.lease import Holder, LeaseLost, acquire
from batchdet.output.layout import STAGING_DIR, Output
from batchdet.pipeline.writing import recover
from helpers.outputs import assert_exactly_once
from helpers.photos import photo

REFUSAL = (r"output {out} is being written by run {run} on host {host} \(pid {pid}\), "
           r"heartbeat \d+ s ago; wait for it or stop it")


@pytest.fixture
def quick_staleness(monkeypatch) -> float:
    """A 3 s staleness limit (heartbeat every 0.5 s) here and in the processes started from here."""
    monkeypatch.setenv("BATCHDET_LEASE_STALE_S", "3")
    return 3.0


@pytest.fixture
def clock(monkeypatch):
    """Moves the clock every lease in this process is timed by (its records'
    heartbeats and their ages): ``clock(seconds)`` jumps it forward, so that
    a lease ages without the test waiting real seconds."""
    real = leasing._now
    ahead = [0.0]
    monkeypatch.setattr(leasing, "_now", lambda: real() + timedelta(seconds=ahead[0]))

    def advance(seconds: float) -> None:
        ahead[0] += seconds

    return advance


def records(out: Output) -> dict[int, dict]:
    return {g: json.loads(out.fs.cat_file(out.lease(g))) for g in leasing._generations(out)}


# --- lease.py alone ----------------------------------------------------------------------------------
def test_one_holder_refuses_the_next_until_released(store):
    out = Output(*store)
    with acquire(out, "run-a") as held:
        (record,) = records(out).values()
        assert (record["run_id"], record["host"], record["pid"]) == ("run-a", socket.gethostname(), os.getpid())
        with pytest.raises(ValueError) as refused:
            acquire(out, "run-b")
        assert re.fullmatch(REFUSAL.format(out=re.escape(store[0]), run="run-a", host=re.escape(socket.gethostname()),
                                           pid=os.getpid()), str(refused.value))
        held.check()
    assert [(g, r["run_id"], r["released"]) for g, r in records(out).items()] == [(0, "run-a", True)]
    acquire(out, "run-b").release()  # a released lease is nobody's: the next generation, the old one deleted
    assert [(g, r["run_id"], r["released"]) for g, r in records(out).items()] == [(1, "run-b", True)]


def _beaten(out: Output, since: str, generation: int = 0, timeout: float = 30) -> str:
    """The lease record's heartbeat once it is later than ``since`` (real seconds pass meanwhile)."""
    deadline = time.monotonic() + timeout
    while datetime.fromisoformat(beat := records(out)[generation]["heartbeat"]) <= datetime.fromisoformat(since):
        assert time.monotonic() < deadline, f"no heartbeat after {since} in {timeout} s"
        time.sleep(0.05)
    return beat


def test_heartbeat_keeps_a_lease_alive_past_the_limit(store, quick_staleness, clock):
    out = Output(*store)
    with acquire(out, "run-a"):
        first = records(out)[0]["heartbeat"]
        clock(quick_staleness + 1)  # past the limit: only a heartbeat since keeps the lease alive
        _beaten(out, first)  # one beat: half a second (quick_staleness / HEARTBEATS_PER_LIMIT)
        with pytest.raises(ValueError, match=r"being written by run run-a .*heartbeat \d+ s ago"):
            acquire(out, "run-b")


def _plant(out: Output, generation: int, **fields) -> None:
    """A lease record as another run would have left it."""
    record = {"run_id": "run-dead", "host": "elsewhere", "pid": 1, "machine": "elsewhere/boot/pid:[1]",
              "started": "2026-01-01T00:00:00+00:00", "heartbeat": "2026-01-01T00:00:00+00:00", **fields}
    out.fs.pipe_file(out.lease(generation), json.dumps(record).encode())


def test_stale_lease_is_taken_over(store):
    out = Output(*store)
    _plant(out, 0)
    with acquire(out, "run-b") as held:
        assert held.generation == 1 and list(records(out)) == [1] and records(out)[1]["run_id"] == "run-b"


def test_lease_of_a_process_gone_from_this_machine_is_taken_over_at_once(store):
    out = Output(*store)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = leasing._now().isoformat()
    _plant(out, 0, pid=int(gone.stdout), machine=leasing._machine(), heartbeat=now, host=socket.gethostname())
    acquire(out, "run-b").release()
    _plant(out, 2, pid=int(gone.stdout), heartbeat=now)  # the same pid on another machine: alive
    with pytest.raises(ValueError, match="being written by run run-dead on host elsewhere"):
        acquire(out, "run-b")


def test_a_run_that_lost_its_lease_neither_recovers_nor_commits(store):
    out = Output(*store)
    out.fs.makedirs(out.join(STAGING_DIR, "run-killed"), exist_ok=True)
    out.fs.pipe_file(out.join(STAGING_DIR, "run-killed", "_run.json"), b"{}")
    frozen = acquire(out, "run-a")
    frozen._stop.set()  # as if the process froze: no more heartbeats
    out.fs.rm_file(out.lease(0))
    _plant(out, 0, run_id="run-b", heartbeat=leasing._now().isoformat())  # a run took it meanwhile
    with pytest.raises(LeaseLost, match=r"run run-a lost its lease .* \(held now by run run-b on host elsewhere"):
        recover(out, frozen)
    assert out.fs.exists(out.join(STAGING_DIR, "run-killed", "_run.json"))
    frozen.release()
    assert records(out)[0]["run_id"] == "run-b", "releasing a lost lease changed the new holder's"
    assert "released" not in records(out)[0]


def test_a_frozen_runs_late_heartbeat_never_makes_its_lease_current_again(store, quick_staleness, clock):
    """A heartbeat is a check, then a write: a run frozen between the two, taken
    over meanwhile by a run that then ended, writes its old record again.
    That record is never the highest generation, so the frozen run knows it
    lost, and the next run is not refused by it."""
    out = Output(*store)
    frozen = acquire(out, "run-a")
    frozen._stop.set()  # frozen between a beat's check and its write
    clock(quick_staleness + 1)
    acquire(out, "run-b").release()  # took the lease over (run-a's record deleted), then ended
    frozen._write(heartbeat=leasing._now().isoformat())  # the frozen beat's write lands, late
    assert sorted(records(out)) == [0, 1] and records(out)[1]["released"]
    with pytest.raises(LeaseLost, match="run run-a lost its lease"):
        frozen.check()
    assert leasing.current_holder(out) is None
    with acquire(out, "run-c") as third:  # not refused by run-a's fresh-looking record
        assert third.generation == 2 and sorted(records(out)) == [2]


def test_racing_runs_take_one_lease(store):
    out = Output(*store)
    start = threading.Barrier(6)
    won: list[str] = []
    refused: list[str] = []

    def race(run_id: str) -> None:
        start.wait()
        try:
            won.append(acquire(out, run_id).run_id)
        except ValueError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=race, args=(f"run-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert all(f"being written by run {won[0]} " in r for r in refused)
    assert [r["run_id"] for r in records(out).values()] == won


def test_unreadable_lease_is_not_taken_over(tmp_path):
    out = Output(str(tmp_path))
    out.fs.pipe_file(out.lease(0), b"not json")
    with pytest.raises(ValueError, match="unreadable lease"):
        acquire(out, "run-b")


def test_holder_age_is_never_negative():
    ahead = Holder("r", "h", 1, "m", "x", (leasing._now().replace(year=2100)).isoformat())
    assert ahead.age_s() == 0.0


# --- two real processes --------------------------------------------------------------------------------
#: Takes the output's lease as a detect run would, stages one ok row for the
#: first image, prints its run id, then waits for a line on stdin (the test
#: may freeze it meanwhile) and reports whether it still holds the lease.
HOLDER = r"""
import hashlib, json, sys
import pyarrow as pa, pyarrow.parquet as pq
from batchdet.api import _record
from batchdet.options import DetectOptions
from batchdet.output.lease import LeaseLost, acquire
from batchdet.output.schema import FILE_SCHEMA
from batchdet.pipeline.plan import plan_run
from batchdet.output.layout import STAGING_DIR, Output
from batchdet.pipeline.update import fresh
from batchdet.pipeline.writing import begin_run

output, options, folder, model = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
plan = plan_run(DetectOptions({"x": folder}, output, model=model, storage_options=options))
out = Output(output, plan.options.storage_options)
with acquire(out, plan.run_id) as lease:
    begin_run(out, _record(plan, fresh(plan.listings)))
    row = {"uri": [plan.listings["x"].uris[0]], "width": [1], "height": [1], "status": ["ok"], "error": [None],
           "detections": [[]], "run_id": [plan.run_id], "size": [plan.listings["x"].sizes[0]],
           "sha256": [hashlib.sha256(open(plan.listings["x"].uris[0], "rb").read()).hexdigest()],
           "version": [plan.listings["x"].versions[0]], "copied_from": [None]}
    out.fs.makedirs(out.join(STAGING_DIR, plan.run_id, "dataset=x"), exist_ok=True)
    with out.fs.open(out.join(STAGING_DIR, plan.run_id, "dataset=x", "0.parquet"), "wb") as f:
        pq.write_table(pa.table(row, schema=FILE_SCHEMA), f)
    print(plan.run_id, flush=True)
    sys.stdin.readline()
    # woken after a takeover, as a frozen writer would be: one more file staged before it learns
    out.fs.makedirs(out.join(STAGING_DIR, plan.run_id, "dataset=x"), exist_ok=True)
    with out.fs.open(out.join(STAGING_DIR, plan.run_id, "dataset=x", "1.parquet"), "wb") as f:
        pq.write_table(pa.table(row, schema=FILE_SCHEMA), f)
    try:
        lease.check()
        print("held", flush=True)
    except LeaseLost as e:
        print("lost:", e, flush=True)
"""


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("batchdet: error:")]


def test_stalled_holder_refuses_then_is_taken_over(store, narrow_model, tmp_path, quick_staleness, clock, capsys):
    output, options = store
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(photo("rocket.jpg"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, output, json.dumps(options), str(folder), str(narrow_model)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held_by = holder.stdout.readline().strip()
        assert held_by, "the holder process did not take the lease"
        argv = ["detect", "--dataset", f"x={folder}", "--output", output, "--model", str(narrow_model),
                *[f"--storage-option={k}={v}" for k, v in options.items()]]
        refusal = REFUSAL.format(out=re.escape(output), run=held_by, host=re.escape(socket.gethostname()),
                                 pid=holder.pid)
        for flag in ("--resume", "--overwrite"):
            assert main([*argv, flag]) == 2
            (line,) = _error_lines(capsys.readouterr().err)
            assert re.fullmatch(f"batchdet: error: {refusal}", line), line
        out = Output(output, options)
        assert out.staged_runs() == [held_by], "a refused run touched the holder's staging folder"

        holder.send_signal(signal.SIGSTOP)  # alive, but its heartbeat stops ...
        time.sleep(0.2)  # (a write it had under way lands)
        last = records(out)[0]["heartbeat"]
        time.sleep(2 * quick_staleness / leasing.HEARTBEATS_PER_LIMIT)  # two beats' time
        assert records(out)[0]["heartbeat"] == last, "the stopped holder still beats"
        clock(quick_staleness + 0.5)  # ... and its lease ages past the limit (this process's clock only)
        result = detect({"x": str(folder)}, output, model=narrow_model, storage_options=options, resume=True,
                        execution="in-process")  # the lease's story is the engine's alike: no Ray to start
        recovered = out.manifests()[held_by]
        assert recovered["recovered"] is True and recovered["datasets"]["x"]["images_ok"] == 1
        assert result.datasets["x"].already_done == 1 and result.datasets["x"].images == 1
        assert out.staged_runs() == [] and [r["released"] for r in records(out).values()] == [True]

        holder.send_signal(signal.SIGCONT)
        said, _ = holder.communicate("go\n", timeout=60)
        assert said.startswith(f"lost: run {held_by} lost its lease"), said
        assert holder.returncode == 0
    finally:
        holder.kill()
        holder.wait()
    # what it staged after the takeover has no run record: never committed, and
    # removed by the next run's recovery
    assert out.staged_runs() == [held_by] and not out.fs.exists(out.run_record(held_by))
    again = detect({"x": str(folder)}, output, model=narrow_model, storage_options=options, resume=True,
                   execution="in-process")
    assert out.staged_runs() == [] and again.datasets["x"].already_done == 2
    rows = [r for f in out.data_files() for r in pq.read_table(out.fs.open(f), columns=["uri", "run_id"]).to_pylist()]
    assert sorted(r["run_id"] for r in rows) == sorted([held_by, result.run_id]), rows  # one row per image


def test_resume_is_refused_while_a_detect_runs_then_completes_it(narrow_model, many_images, tmp_path, capsys):
    """The issue's case: run B with --resume while run A works no longer commits A's staging folder.
    A (a CLI process) is held at its last file, a FIFO no one writes yet: it
    works for as long as the test needs, then finishes once the FIFO is let go."""
    out, images = tmp_path / "out", tmp_path / "images"
    images.mkdir()
    for f in sorted(many_images.iterdir())[:12]:  # broken.jpg, img000 ... img010
        (images / f.name).write_bytes(f.read_bytes())
    held = images / "zz-held.jpg"
    os.mkfifo(held)
    first = subprocess.Popen(
        [sys.executable, "-m", "batchdet.cli", "detect", "--dataset", f"many={images}", "--output", str(out),
         "--model", str(narrow_model), "--rows-per-file", "2", "--batch-size", "1", "--execution", "in-process"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # A in a process of its own, B in this one: two drivers, as two terminals would be
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out.glob("_staging/*/dataset=many/*.parquet")):
            assert first.poll() is None, "the first run finished before a second could meet it"
            time.sleep(0.05)
        (staged,) = list(out.glob("_staging/*"))
        argv = ["detect", "--dataset", f"many={images}", "--output", str(out), "--model", str(narrow_model)]
        assert main([*argv, "--resume"]) == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert re.fullmatch("batchdet: error: " + REFUSAL.format(
            out=re.escape(str(out)), run=staged.name, host=re.escape(socket.gethostname()), pid=first.pid), line), line
        assert first.poll() is None, "the first run did not outlive the refusal: the test proves nothing"
        deadline = time.monotonic() + 120
        while True:  # let A read its last file (empty: an error row) and finish
            try:
                os.close(os.open(held, os.O_WRONLY | os.O_NONBLOCK))  # A reads an empty file
                break
            except OSError:  # ENXIO: A has not opened it yet
                assert first.poll() is None and time.monotonic() < deadline, "A never reached its last file"
                time.sleep(0.05)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    held.unlink()
    again = detect({"many": str(images)}, str(out), model=narrow_model, resume=True,
                   execution="in-process")  # what A committed is read by the plan
    assert again.datasets["many"].already_done == 11 and again.datasets["many"].images == 1  # broken.jpg again
    assert_exactly_once(out, images)
    assert not json.loads((out / "_runs" / f"{staged.name}.json").read_text()).get("recovered")

"""The progress line and the quiet terminal: what a person sees while a run works."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from batchdet.console import quiet
from batchdet import progress
from batchdet.progress import Counter, Halt, Progress, ProgressLine, Reporter, Stalled, Watchdog, halt


def test_progress_line_counts_rate_and_time_left():
    assert Progress(0, 0, 100, 4.2, None).line() == "0/100 images  starting (0:00:04)"
    p = Progress(40, 2, 100, 30.0, 4.0, since_last_s=5.0)
    assert p.left_s == 60 / 4.0 - 5.0
    assert p.line() == "40/100 images (2 errors)  4.00 images/s  0:00:10 left"
    assert Progress(1_000, 1, 1_000_000, 1, 250.0).line() == "1,000/1,000,000 images (1 error)  250.00 images/s  1:06:36 left"
    assert Progress(99, 0, 100, 9, 1.0, since_last_s=3.0).left_s == 0.0  # overdue: never negative


def test_counter_rate_leaves_start_up_out():
    c = Counter()
    t = c.read()
    assert (t.done, t.errors, t.first, t.loaded) == (0, 0, None, None)
    c.add_loaded()
    c.add(4, 1)
    c.add_read(8)
    t = c.read()
    assert (t.done, t.errors, t.first_done, t.files_read) == (4, 1, 4, 8) and t.loaded <= t.first == t.last <= t.now
    loaded = t.loaded
    c.add_loaded()  # a second stage's model: the first one counts
    c.add(6, 0)
    t = c.read()
    assert (t.done, t.errors, t.first_done, t.loaded) == (10, 1, 4, loaded) and t.last >= t.first


def test_watchdog_names_the_stage_and_waits_longer_for_slow_blocks():
    """Times are the driver's clock at each poll: a block counts as finished
    when the watchdog first sees the count grow."""
    w = Watchdog(timeout_s=60, started=1000.0, startup_s=0)
    assert w.check(0, 10, 0, 1059) is None
    assert w.check(0, 10, 0, 1061).startswith("no image finished in 61 s (reading stalled: 0 of 10 files read)")
    w = Watchdog(timeout_s=60, started=1000.0, startup_s=300)  # start-up has its own allowance, if longer
    assert w.check(0, 10, 0, 1299) is None and w.check(0, 10, 0, 1301) is not None
    w = Watchdog(timeout_s=60, started=1000.0, startup_s=300)
    assert w.check(1, 10, 3, 1050) is None  # the first block: start-up, not a gap between blocks
    assert w.check(1, 10, 3, 1109) is None
    assert w.check(1, 10, 3, 1111) is not None  # so 60 s after it the run has stalled
    w = Watchdog(timeout_s=60, started=1000.0)
    w.check(1, 10, 3, 1050)
    assert w.check(2, 10, 5, 1150) is None  # 100 s after the first: the longest gap so far
    assert w.check(2, 10, 5, 1549) is None  # 4 x 100 s is the limit now, not 60 s
    assert "inference stalled: 5 files read, 2 images done" in w.check(2, 10, 5, 1551)
    assert w.check(10, 10, 10, 9999) is None  # a finished run never stalls
    assert Watchdog(timeout_s=0, started=0).check(0, 10, 0, 1e9) is None  # 0: never


def test_halt_stops_a_thread_waiting_in_a_python_loop():
    """Ray Data's driver waits for its output in a Python loop of 10 ms sleeps:
    a halt raised in the job's own thread lands there at once."""
    caught = threading.Event()

    def busy() -> None:  # stands in for Ray Data's driver loop
        try:
            _wait_in_python(30)
        except Halt:
            caught.set()

    worker = threading.Thread(target=busy)
    worker.start()
    start = time.monotonic()
    halt(worker)
    worker.join(10)
    assert caught.is_set() and not worker.is_alive() and time.monotonic() - start < 5


def _sentinel_handler(signum, frame) -> None:  # a caller's own SIGINT handler
    raise AssertionError("batchdet touched the caller's SIGINT")


def _wait_in_python(seconds: float) -> None:
    """As Ray Data's driver waits for output: short sleeps in a Python loop
    (a halt lands between two; a single C-level wait would hold it up)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_stalled_job_is_halted_again_until_it_unwinds_and_the_caller_is_left_alone(ray_local, monkeypatch):
    """A clean-up that swallows the first halt (Ray Data's may) gets another,
    every REPEAT_INTERRUPT_S seconds; the caller's thread is never
    interrupted and its SIGINT handler is the one it set."""
    monkeypatch.setattr(progress, "REPEAT_INTERRUPT_S", 1.0)  # 5 s by default: the test need not wait for it
    halts = []

    def work(counter) -> None:
        start = time.monotonic()
        while len(halts) < 2:
            try:
                _wait_in_python(60)  # the counter actor may take ~10 s to start under load
            except Halt:
                halts.append(time.monotonic() - start)

    saved = signal.signal(signal.SIGINT, _sentinel_handler)
    try:
        with pytest.raises(Stalled, match="reading stalled: 0 of 5 files read"):
            Reporter(total=5, stall_timeout_s=1.0, interval=0.2, startup_s=0).run(work)
        assert signal.getsignal(signal.SIGINT) is _sentinel_handler
    finally:
        signal.signal(signal.SIGINT, saved)
    assert len(halts) == 2 and halts[0] < 25 and halts[1] - halts[0] >= progress.REPEAT_INTERRUPT_S - 0.5, halts
    assert not [t for t in threading.enumerate() if t.name == "batchdet-pipeline"]


def test_ctrl_c_in_the_caller_halts_the_job_and_is_raised_on():
    """The caller's Ctrl-C (a real SIGINT, handled by Python's default handler)
    lands in the caller's timed wait, halts the job's thread, and goes on."""
    seen = []
    started = threading.Event()

    def work(counter) -> None:
        try:
            started.set()  # inside the try: a halt may land before set() returns
            _wait_in_python(60)
        except Halt:
            seen.append("halted")

    def press_ctrl_c() -> None:
        started.wait(30)
        os.kill(os.getpid(), signal.SIGINT)

    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=press_ctrl_c).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            Reporter(total=5, stall_timeout_s=0).run(work)  # nobody watches: no counter actor, no Ray
        assert time.monotonic() - start < 10
    finally:
        signal.signal(signal.SIGINT, saved)
    assert seen == ["halted"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_rewrites_one_line_on_a_terminal_and_logs_lines_elsewhere():
    tty = _Terminal()
    line = ProgressLine(tty)
    for done in (0, 5, 10, 10):  # the last one twice, as the final poll repeats it
        line(Progress(done, 0, 10, 1.0, 2.0 if done else None))
    text = tty.getvalue()
    assert text.count("\n") == 1 and text.endswith("10/10 images  2.00 images/s  0:00:00 left\n")
    assert text.count("\r") == 3

    tty = _Terminal()
    line = ProgressLine(tty)
    line.listing("coco", 1000)
    line.listing("coco", 250_000)
    line(Progress(0, 0, 10, 1.0, None))  # the listing line is overwritten, padded to its width
    assert tty.getvalue() == ("\r  listing coco: 1,000 files so far\r  listing coco: 250,000 files so far"
                              "\r" + "  0/10 images  starting (0:00:01)".ljust(36))
    line.close()  # the run failed: what follows starts on a line of its own
    assert tty.getvalue().endswith("starting (0:00:01)   \n")
    line.close()
    assert tty.getvalue().count("\n") == 1

    log = io.StringIO()
    line = ProgressLine(log, every=3600)
    for done in (0, 5, 10, 10):
        line(Progress(done, 0, 10, 1.0, 2.0 if done else None))
    assert log.getvalue().splitlines() == ["  0/10 images  starting (0:00:01)", "  10/10 images  2.00 images/s  0:00:00 left"]


def test_quiet_sends_everything_to_the_log_and_keeps_the_terminal(tmp_path, capfd):
    log = tmp_path / "run.log"
    with quiet(log) as terminal:
        print("python print", file=sys.__stdout__, flush=True)  # the process's own stdout (pytest swaps sys.stdout)
        os.write(2, b"C-level stderr\n")  # what Ray's C++ core writes
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
        terminal.write("progress\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == "progress\n"
    assert log.read_text().splitlines() == ["python print", "C-level stderr", "child out", "child err"]


def test_detect_prints_progress_and_summary_and_keeps_ray_in_its_log(narrow_model, many_images, tmp_path,
                                                                     ray_local, execution):
    """The CLI as a user runs it (a fresh process that, on the Ray path,
    joins a running Ray): the terminal gets the progress and the summary;
    everything else, Ray's own lines and the C++ core's included, lands in
    the log file the summary names. (A Ray of the process's own starts
    quietly: test_pipeline's fresh interpreter checks it.)"""
    import pyarrow.dataset as pads

    folder, n = tmp_path / "many", 9  # broken.jpg and 8 images: what is shown, not the run's length, is tested
    folder.mkdir()
    for f in sorted(many_images.iterdir())[:n]:
        (folder / f.name).symlink_to(f)
    proc = subprocess.run(
        [sys.executable, "-m", "batchdet.cli", "detect", "--dataset", f"many={folder}",
         "--output", str(tmp_path / "out"), "--model", str(narrow_model), "--execution", execution],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=ray_local.env() if execution == "ray" else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = pads.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table(columns=["status"])
    assert sorted(rows.column("status").to_pylist()) == ["error"] + ["ok"] * (n - 1)
    lines = (proc.stdout + proc.stderr).splitlines()
    # off a terminal the progress line repeats every 30 s (more of them on a loaded machine); the rest is bounded
    progress = [x for x in lines if x.strip().split(" ", 1)[0].endswith(f"/{n}")]
    assert 1 <= len(progress) and len(lines) - len(progress) <= 10, lines
    assert not [x for x in lines if " INFO " in x or "core_worker" in x or "WARNING" in x], lines
    done = f"{n}/{n} images (1 error)"
    assert lines[-1].startswith(done) or any(x.strip().startswith(done) for x in lines)
    assert any(x.split()[:2] == ["many", str(n)] for x in lines)  # the summary's row
    log = next(x.split("log: ", 1)[1] for x in lines if x.startswith("  log: "))
    text = open(log, encoding="utf-8", errors="replace").read()
    assert f"dataset many: {n} images listed" in text
    ray_lines = ["Connecting to existing Ray cluster", "Data sink WriteStaging finished"]
    assert [x in text for x in ray_lines] == [execution == "ray"] * 2, text


#: Seconds with no image finished before a stall test's run is halted, where
#: nothing written is checked (after the first block, the one left is stuck).
STALL_S = 1


def _staged_rows(output: Path) -> int:
    """Rows in the output's staged files that can be read whole so far."""
    rows = 0
    for path in output.glob("_staging/*/dataset=*/*.parquet"):
        try:
            rows += pq.read_metadata(path).num_rows
        except (OSError, ValueError):  # still being written
            pass
    return rows


def _fast_forward_when(monkeypatch, ready: Callable[[], bool], limit_s: float = 120) -> list[bool]:
    """The watchdog's clock (``progress._now``) runs a thousand times fast
    once ``ready()`` holds (checked from a thread every 0.1 s, for at most
    ``limit_s`` s): a stall test's timeout passes when the test says, not
    after real seconds, however late the watchdog sees the last block. The
    list it returns gets True when that happens."""
    since, started = [None], []
    real = progress._now

    def now() -> float:
        t = real()
        return t if since[0] is None else t + 999 * (t - since[0])

    monkeypatch.setattr(progress, "_now", now)

    def watch() -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if ready():
                since[0], started[:] = real(), [True]
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    return started


def _release(fifo) -> None:
    """Open the FIFO's writing end, if anyone still waits to read it: they
    read an empty file and go on."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader left
        pass


def test_a_stuck_read_fails_the_run_naming_the_stage_and_resume_finishes_it(narrow_model, many_images, tmp_path,
                                                                             ray_local, execution, capsys,
                                                                             monkeypatch):
    """A FIFO with no writer blocks whoever opens it: a real stall in the read
    stage. The run fails with one line naming it; rows written before are
    kept, and once the file is gone ``--resume`` completes the run."""
    from batchdet.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(many_images.iterdir())[:9]:  # broken.jpg, img000 ... img007
        (folder / f.name).write_bytes(f.read_bytes())
    os.mkfifo(folder / "zz-stuck.jpg")
    # Two blocks of five: the first (broken.jpg, img000-003) finishes, the
    # second (img004-007 and the FIFO) never does. The watchdog's clock runs
    # fast once the first block's five rows are staged (a Ray run's reach a
    # write task after the block): no real timeout to wait for, none too
    # short for a loaded machine.
    fast = _fast_forward_when(monkeypatch, lambda: _staged_rows(tmp_path / "out") >= 5)
    argv = ["detect", "--dataset", f"d={folder}", "--output", str(tmp_path / "out"), "--model", str(narrow_model),
            "--batch-size", "5", "--rows-per-file", "1", "--execution", execution, "--stall-timeout", "60"]
    try:
        status = main(argv)  # in this process, on ray_local's Ray: no process or Ray to start
    finally:
        _release(folder / "zz-stuck.jpg")  # a read still blocked in it would hold a worker of ray_local's
    err = capsys.readouterr().err
    assert status == 2 and fast, err
    error = [x for x in err.splitlines() if x.startswith("batchdet: error:")]
    assert len(error) == 1 and "reading stalled: 5 of 10 files read" in error[0] and "--resume" in error[0], err
    (folder / "zz-stuck.jpg").unlink()
    from batchdet.api import detect  # the resume in this process: one Ray start fewer

    # in-process on either engine: what is checked is what the stalled run kept, which the plan reads
    again = detect({"d": str(folder)}, str(tmp_path / "out"), model=narrow_model, resume=True, execution="in-process")
    # the stalled run's first block was kept: 4 ok rows skipped, its error row (broken.jpg) retried with the rest
    assert (again.datasets["d"].already_done, again.datasets["d"].images) == (4, 5)
    rows = pq.read_table(tmp_path / "out" / "dataset=d").to_pylist()
    ok = sorted(r["uri"] for r in rows if r["status"] == "ok")
    assert ok == sorted(str(f) for f in folder.glob("img*.jpg")) and len(ok) == 8  # each once, across both runs
    broken = [r for r in rows if r["status"] == "error"]  # an error row from each run: resume retries errors
    assert {r["uri"] for r in broken} == {str(folder / "broken.jpg")} and len({r["run_id"] for r in broken}) == 2


def test_a_stall_in_detect_leaves_the_callers_process_alone(narrow_model, many_images, tmp_path, ray_local,
                                                            execution):
    """The API stops a stalled run without touching its caller: the SIGINT
    handler is the caller's throughout, no thread of batchdet's is left, and
    Pillow's bomb guard is as it was."""
    from PIL import Image

    from batchdet.api import detect

    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(many_images.glob("img*.jpg"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    os.mkfifo(folder / "zz-stuck.jpg")  # the second block: stuck in its read
    pixels = Image.MAX_IMAGE_PIXELS
    threads_before = set(threading.enumerate())
    saved = signal.signal(signal.SIGINT, _sentinel_handler)
    try:
        with pytest.raises(Stalled, match="reading stalled: 3 of 4 files read"):
            detect({"d": str(folder)}, str(tmp_path / "out"), model=narrow_model, batch_size=3, stall_timeout=STALL_S,
                   execution=execution)  # nothing written is checked: no wait for the write task
        assert signal.getsignal(signal.SIGINT) is _sentinel_handler
    finally:
        signal.signal(signal.SIGINT, saved)
        _release(folder / "zz-stuck.jpg")
    assert Image.MAX_IMAGE_PIXELS == pixels
    # in-process, the read stuck in the FIFO's open() returns once released, and its thread ends
    deadline = time.monotonic() + 10
    while [t for t in set(threading.enumerate()) - threads_before if t.name.startswith("batchdet-")]:
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.05)

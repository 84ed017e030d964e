"""How far a run is, and whether it still moves.

The read tasks and the inference actors report each block they finish to one
small counter actor; the driver runs the job in a thread of its own and, while
it waits for it, polls the counter, hands a :class:`Progress` to the caller's
callback (the CLI draws one line from it; a Python user can feed tqdm or a
log), and stops a run in which nothing has moved for too long, saying which
stage stalled (:class:`Watchdog`). Nothing here touches the caller's signal
handlers or threads: a library leaves its caller's process as it found it.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO


@dataclass(frozen=True)
class Progress:
    done: int  # images with a row (ok or error)
    errors: int
    total: int
    elapsed_s: float  # since the pipeline started (Ray up, model loading included)
    rate: float | None  # images/s from the first finished block to the latest (start-up left out)
    since_last_s: float = 0.0  # since the latest block finished

    @property
    def left_s(self) -> float | None:
        """Time to the last image at ``rate``, counted from the latest block."""
        return max(0.0, (self.total - self.done) / self.rate - self.since_last_s) if self.rate else None

    def line(self) -> str:
        """``  37/100 images (2 errors)  4.21 images/s  0:00:15 left``"""
        text = f"{self.done:,}/{self.total:,} images"
        if self.errors:
            text += f" ({self.errors:,} error{'s' * (self.errors != 1)})"
        if self.rate:
            text += f"  {self.rate:.2f} images/s  {_clock(self.left_s)} left"
        else:
            text += f"  starting ({_clock(self.elapsed_s)})"
        return text


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass(frozen=True)
class Tally:
    """What the counter says at ``now`` (epoch seconds, as every time here)."""

    done: int
    errors: int
    files_read: int
    first: float | None  # when the first block finished
    first_done: int  # and how many images it held
    last: float | None  # when the latest block finished
    loaded: float | None  # when the first inference stage had its model loaded
    now: float


class Counter:
    """Added to by the read and inference stages, read by the driver: the
    counter actor's class on Ray, a plain object in the in-process run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the in-process run's threads add at once
        self.done = self.errors = self.files_read = self.first_done = 0
        self.first: float | None = None
        self.last: float | None = None
        self.loaded: float | None = None

    def add(self, done: int, errors: int) -> None:
        with self._lock:
            self.last = time.time()
            if self.first is None:
                self.first, self.first_done = self.last, done
            self.done += done
            self.errors += errors

    def add_read(self, files: int) -> None:
        with self._lock:
            self.files_read += files

    def add_loaded(self) -> None:
        with self._lock:
            self.loaded = self.loaded or time.time()

    def read(self) -> Tally:
        with self._lock:
            return Tally(self.done, self.errors, self.files_read, self.first, self.first_done, self.last,
                         self.loaded, time.time())

    def close(self) -> None:
        """Nothing to let go of (the actor's client kills its actor)."""


class RemoteCounter:
    """The counter actor as the stages and the driver call it: :class:`Counter`'s
    methods, the adds fire-and-forget. It travels to the stages with the job."""

    def __init__(self) -> None:
        import ray

        # no CPU of its own: it must never wait for a slot behind the actors
        self.actor = ray.remote(num_cpus=0)(Counter).remote()

    def add(self, done: int, errors: int) -> None:
        self.actor.add.remote(done, errors)

    def add_read(self, files: int) -> None:
        self.actor.add_read.remote(files)

    def add_loaded(self) -> None:
        self.actor.add_loaded.remote()

    def read(self) -> Tally:
        import ray

        return ray.get(self.actor.read.remote(), timeout=10)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


#: Seconds with no image finished before a run counts as stalled, at the least
#: (``--stall-timeout``): a block of 64 full-model images on one slow core fits in it.
DEFAULT_STALL_S = 900.0
#: Seconds the first block may take, at the least, whatever ``--stall-timeout``
#: says: start-up (Ray, nodes an autoscaler adds, the model's download and
#: load) is no block's pace, and a short timeout must not cut it.
STARTUP_S = 900.0
#: Seconds between halts of a stalled run's pipeline thread that has not unwound yet.
REPEAT_INTERRUPT_S = 5.0
#: Once blocks finish, a run is stalled only after this many times the
#: longest gap seen between two of them, if that is longer than the timeout
#: (the wait for the first block is start-up, not a block's pace).
STALL_GAPS = 4


class Stalled(TimeoutError):
    """No image finished for too long; the message names the stage. What the
    run wrote so far stays staged: ``--resume`` commits it."""


def _now() -> float:
    """The watchdog's clock (one name, so that tests can move it): the
    driver's monotonic clock, which no change of the wall clock can jump."""
    return time.monotonic()


class Watchdog:
    """Decides, from what the counter says, whether a run has stalled. It
    times blocks by when it sees the count of finished images grow, on the
    driver's clock (:func:`_now`), to the nearest poll."""

    def __init__(self, timeout_s: float, started: float, startup_s: float = STARTUP_S):
        self.timeout_s, self.started, self.startup_s = timeout_s, started, startup_s
        self.longest_gap = 0.0
        self._done = 0
        self._last_done: float | None = None  # when ``done`` last grew

    def check(self, done: int, total: int, files_read: int, now: float) -> str | None:
        """None while the run moves, else the one-line reason."""
        if done > self._done:
            if self._last_done is not None:  # the wait for the first block is start-up, not a gap
                self.longest_gap = max(self.longest_gap, now - self._last_done)
            self._done, self._last_done = done, now
        if self.timeout_s <= 0 or done >= total:
            return None
        if self._last_done is None:  # start-up: no block finished yet
            since, limit = self.started, max(self.timeout_s, self.startup_s)
        else:
            since, limit = self._last_done, max(self.timeout_s, STALL_GAPS * self.longest_gap)
        idle = now - since
        if idle < limit:
            return None
        if files_read <= done:
            stage = f"reading stalled: {files_read:,} of {total:,} files read"
        else:
            stage = f"inference stalled: {files_read:,} files read, {done:,} images done"
        return (f"no image finished in {idle:.0f} s ({stage}); what the run wrote is kept: "
                "run again with --resume (and a larger --stall-timeout if blocks are that slow)")


class Reporter:
    """Driver side of a run: :meth:`run` does the job in a thread of its own,
    polls the counter every ``interval`` seconds, calls ``callback`` (if
    any) with each new :class:`Progress`, and halts that thread — never its
    caller's, and with no signal — when the :class:`Watchdog` says the run
    stalled or the caller presses Ctrl-C. ``counter`` makes the job's
    counter (:class:`RemoteCounter` for Ray; it is only made when someone
    watches: a callback or a stall timeout)."""

    def __init__(self, total: int, callback: Callable[[Progress], None] | None = None,
                 stall_timeout_s: float = DEFAULT_STALL_S, interval: float = 1.0, startup_s: float = STARTUP_S,
                 counter: Callable[[], Counter | RemoteCounter] = RemoteCounter):
        self.total, self.callback, self.interval = total, callback, interval
        self.watched = callback is not None or stall_timeout_s > 0
        self._make_counter = counter
        self.counter: Counter | RemoteCounter | None = None
        self._started = time.time()
        self.watchdog = Watchdog(stall_timeout_s, _now(), startup_s)
        self.stalled: str | None = None
        self.tally: Tally | None = None  # the counter's last word
        self._halted: float | None = None  # when the job's thread was last halted (time.monotonic())

    def run(self, work: Callable[[Counter | RemoteCounter | None], None]) -> None:
        """``work(counter)`` — None when nobody watches — in a thread of its
        own; the caller waits in timed waits, so its Ctrl-C lands here and
        halts the job (again every REPEAT_INTERRUPT_S seconds until it
        unwinds) before KeyboardInterrupt is raised on. Raises
        :class:`Stalled` for a stall, and ``work``'s own error as it is."""
        failure: list[BaseException] = []
        # an Event, not Thread.join: a join that Ctrl-C interrupts marks the
        # thread stopped while it still runs (CPython 3.11, bpo-45274's fix)
        finished = threading.Event()

        def job() -> None:
            try:
                work(self.counter)
            except BaseException as e:  # noqa: B036 - handed over to the caller's thread
                failure.append(e)
            finally:
                finished.set()

        if self.watched:
            self.counter = self._make_counter()
        thread = threading.Thread(target=job, name="batchdet-pipeline", daemon=True)
        try:
            thread.start()  # in the try: a Ctrl-C may land while start() waits for the thread to run
            while not finished.wait(self.interval):  # a timed wait: the caller's Ctrl-C lands here
                if self.counter is not None:
                    self._poll(thread)
        except KeyboardInterrupt:
            while thread.ident is not None and not finished.is_set():
                halt(thread)
                finished.wait(REPEAT_INTERRUPT_S)
            raise
        finally:
            if self.counter is not None:
                self._poll(None)  # the final count; the run is over, stalled or not
                self.counter.close()
        if self.stalled:
            raise Stalled(self.stalled)
        if failure and not isinstance(failure[0], Halt):
            raise failure[0]

    def timings(self) -> dict[str, float | None]:
        """When the first inference stage had its model loaded (``model_loaded``)
        and the first block finished (``first_result``): epoch seconds, None if
        not reached or nobody watched."""
        t = self.tally
        return {"model_loaded": t and t.loaded, "first_result": t and t.first}

    def _poll(self, thread: threading.Thread | None) -> None:
        """Report, and halt ``thread`` if the run stalled (None: report only)."""
        if self.stalled:
            # Ray Data may catch the halt in its clean-up, or block there on
            # the stalled task: halt again until the job's thread unwinds
            if thread is not None and time.monotonic() - self._halted >= REPEAT_INTERRUPT_S:
                self._halt(thread)
            return
        try:
            t = self.tally = self.counter.read()
        except Exception:  # a slow or lost counter actor costs the display, never the run
            return
        rate = (t.done - t.first_done) / (t.last - t.first) if t.first is not None and t.last - t.first > 0.5 else None
        if self.callback:
            self.callback(Progress(t.done, t.errors, self.total, time.time() - self._started, rate,
                                   t.now - t.last if t.last is not None else 0.0))
        reason = self.watchdog.check(t.done, self.total, t.files_read, _now()) if thread is not None else None
        if reason:
            self.stalled = reason
            self._halt(thread)

    def _halt(self, thread: threading.Thread) -> None:
        self._halted = time.monotonic()
        halt(thread)


class Halt(BaseException):
    """Raised in a run's own thread to stop it (a stall, the caller's Ctrl-C).
    A BaseException, so that no ``except Exception`` on the way (Ray Data's
    among them) takes it for the job's own error."""


def halt(thread: threading.Thread) -> None:
    """Raise :class:`Halt` in ``thread`` at its next Python instruction. Only
    for the thread :meth:`Reporter.run` started: Ray Data's driver waits in a
    Python loop (10 ms sleeps between looks at its output queue), so the halt
    lands at once, and no signal handler or caller's thread is touched."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Halt))


class ProgressLine:
    """A callback drawing one line on ``stream``: rewritten in place on a
    terminal, else (a log, a Ray job's output) a line every ``every`` seconds."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 30.0):
        self.stream, self.every = stream, every
        self.tty = stream.isatty()
        self._last: float | None = None  # when the last line was written (not on a terminal)
        self._width = 0
        self._finished = False

    def __call__(self, p: Progress) -> None:
        if self._finished:
            return
        self._finished = p.done == p.total
        self._show("  " + p.line(), self._finished)

    def listing(self, dataset: str, files: int) -> None:
        """``  listing coco: 45,000 files so far``: a large prefix takes a while to list."""
        self._show(f"  listing {dataset}: {files:,} files so far", False)

    def close(self) -> None:
        """End an open line on a terminal, so that what follows (an error) starts on its own."""
        if self.tty and self._width and not self._finished:
            self.stream.write("\n")
            self.stream.flush()
            self._finished = True

    def _show(self, text: str, last: bool) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            if last:
                self.stream.write("\n")
        elif self._last is None or time.monotonic() - self._last >= self.every or last:
            self.stream.write(text + "\n")
            self._last = time.monotonic()
        self.stream.flush()

"""How far a run is: images done of the total, the rate, the time left.

The inference actors report each block they finish to one small counter
actor; a thread in the driver polls it and hands a :class:`Progress` to the
caller's callback (the CLI draws one line from it; a Python user can feed
tqdm or a log). A block is a few seconds of work at most, so the count
moves smoothly whatever the model's speed.
"""

from __future__ import annotations

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


class Counter:
    """The counter actor's class: added to by the actors, read by the driver."""

    def __init__(self) -> None:
        self.done = self.errors = 0
        self.first: float | None = None  # when the first block finished, and how many it held
        self.first_done = 0
        self.last: float | None = None  # when the latest block finished

    def add(self, done: int, errors: int) -> None:
        self.last = time.time()
        if self.first is None:
            self.first, self.first_done = self.last, done
        self.done += done
        self.errors += errors

    def read(self) -> tuple[int, int, float | None, int, float | None, float]:
        return self.done, self.errors, self.first, self.first_done, self.last, time.time()


class Reporter:
    """Driver side: start the counter actor, poll it every ``interval``
    seconds and call ``callback`` with each new :class:`Progress`."""

    def __init__(self, total: int, callback: Callable[[Progress], None], interval: float = 1.0):
        import ray

        self.total, self.callback, self.interval = total, callback, interval
        # no CPU of its own: it must never wait for a slot behind the actors
        self.counter = ray.remote(num_cpus=0)(Counter).remote()
        self._started = time.time()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Reporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._halt.set()
        self._thread.join()
        self._poll()  # the final count
        ray.kill(self.counter)

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        import ray

        try:
            done, errors, first, first_done, last, now = ray.get(self.counter.read.remote(), timeout=10)
        except Exception:  # a slow or lost counter costs the display, never the run
            return
        rate = (done - first_done) / (last - first) if first is not None and last - first > 0.5 else None
        self.callback(Progress(done, errors, self.total, time.time() - self._started, rate,
                               now - last if last is not None else 0.0))


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
        text = "  " + p.line()
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            if self._finished:
                self.stream.write("\n")
        elif self._last is None or time.monotonic() - self._last >= self.every or self._finished:
            self.stream.write(text + "\n")
            self._last = time.monotonic()
        self.stream.flush()

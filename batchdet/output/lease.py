"""One writer per output: a run holds a lease on its output while it works.

Two runs on one output corrupt each other: a ``--resume`` would commit (and
delete) the staging folder of a run that is still writing it, an
``--overwrite`` would delete it. So every run first takes the output's lease
and keeps it fresh with a heartbeat; another run facing a live lease is
refused with one line naming the holder, and only the holder may recover or
clear anything.

The lease is a small JSON record ``OUTPUT/_lease.<generation>.json`` (run id,
host, pid, start and heartbeat times); the highest generation is the current
lease. Taking it needs only one primitive, *create if absent*, which both
stores offer atomically: locally a hard link of a fully written temporary
file (``link`` fails if the name exists, and readers never see a partial
record); on S3 a PutObject with ``If-None-Match: *`` (s3fs's
``pipe_file(mode="create")``; AWS S3, MinIO and moto honour it). Every create
is read back, which also covers a retried PUT whose first attempt did land,
and narrows (does not close) the race on stores that ignore the header.
Taking over a dead run's lease is creating the next generation, so of two
runs taking over the same dead lease exactly one wins, and the dead run, if
it was only frozen, sees the higher generation and commits nothing. A run
that ends marks its record released rather than deleting it, and only a
new holder deletes the generations below its own: the highest generation
never goes away, so a frozen run's late heartbeat, which may write its old
record again, can never make that record the highest.

A lease is dead when its heartbeat is older than :data:`STALE_AFTER_S`
(``$BATCHDET_LEASE_STALE_S``), or at once when its holder ran on this very
machine and its process no longer exists (a killed run can be resumed
straight away). Heartbeat times are the holder's wall clock, so drivers'
clocks must agree to well within the limit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from types import TracebackType

from batchdet.errors import one_line
from batchdet.files import AtomicFile, replace_bytes
from batchdet.output.layout import Output
from batchdet.storage import is_local

log = logging.getLogger("batchdet")

#: Seconds without a heartbeat after which a lease's run counts as killed and
#: its lease may be taken over. ``$BATCHDET_LEASE_STALE_S`` overrides it.
STALE_AFTER_S = 60.0
#: Heartbeats per staleness limit (every 10 s by default): several may be
#: lost to a slow or failing store before a live run looks dead.
HEARTBEATS_PER_LIMIT = 6
#: How many times taking the lease is retried when another run changes it in between.
ATTEMPTS = 5


def stale_after_s() -> float:
    """The staleness limit in force: ``$BATCHDET_LEASE_STALE_S`` or :data:`STALE_AFTER_S`."""
    return float(os.environ.get("BATCHDET_LEASE_STALE_S") or STALE_AFTER_S)


def _now() -> datetime:
    """The clock of every heartbeat and age here (one name, so that tests can move it)."""
    return datetime.now(timezone.utc)


def _machine() -> str:
    """This kernel and PID namespace: where a pid means the same process.

    The host name alone is not enough (containers may share one); two
    processes see the same boot id and PID namespace only if a pid names
    the same process for both.
    """
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:  # not Linux: the host name is all there is
        pass
    return "/".join(parts)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """A lease record: who writes the output, and when it last said so."""

    run_id: str
    host: str
    pid: int
    machine: str
    started: str
    heartbeat: str
    released: bool = False  #: the run ended: nobody holds the lease (records before this field: absent)

    def age_s(self) -> float:
        """Seconds since the last heartbeat (never negative: clocks may differ a little)."""
        return max(0.0, (_now() - datetime.fromisoformat(self.heartbeat)).total_seconds())

    def is_alive(self, limit_s: float) -> bool:
        """False when released, when the heartbeat is stale, or when the holder's
        process is gone from this machine."""
        if self.released:
            return False
        if self.machine == _machine() and not _process_exists(self.pid):
            return False
        return self.age_s() <= limit_s

    def describe(self) -> str:
        return f"run {self.run_id} on host {self.host} (pid {self.pid}), heartbeat {self.age_s():.0f} s ago"


class LeaseLost(OSError):
    """Another run took this run's lease over: it must not commit or recover anything.
    (An OSError, like a storage failure: the CLI reports it in one line.)"""


def _generations(out: Output) -> list[int]:
    """The lease generations present, highest last (listing caches dropped:
    another process may have changed them)."""
    out.fs.invalidate_cache(out.root)
    return out.lease_generations()


def _read(out: Output, generation: int) -> Holder | None:
    """The record of ``generation``; None if it vanished (released meanwhile).

    A record that does not parse was not written by batchdet (records are
    written whole) and raises, rather than being silently taken over.
    """
    try:
        data = out.fs.cat_file(out.lease(generation))
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError) as e:
        raise ValueError(f"output {out.url} has an unreadable lease {out.lease(generation)} "
                         f"({type(e).__name__}); delete it if no run is writing there") from None


def _create(out: Output, generation: int, holder: Holder) -> bool:
    """Create ``generation``'s record if absent; True if it is now ``holder``'s."""
    path = out.lease(generation)
    data = json.dumps(asdict(holder)).encode()
    if is_local(out.fs):
        out.fs.makedirs(out.root, exist_ok=True)
        with AtomicFile(path) as file:  # written whole, then linked: no reader sees half a record
            file.temp.write_bytes(data)
            try:
                os.link(file.temp, path)
            except FileExistsError:
                return False
        return True
    try:
        out.fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        pass  # someone's record is there, perhaps ours from a retried PUT: read back
    record = _read(out, generation)
    return record is not None and record.run_id == holder.run_id


class Lease:
    """The lease ``run_id`` holds on ``out``, kept fresh by a daemon thread
    until :meth:`release` (a ``with`` block releases it however it ends)."""

    def __init__(self, out: Output, generation: int, holder: Holder, limit_s: float):
        self.out = out
        self.generation = generation
        self.holder = holder
        self.limit_s = limit_s
        self._stop = threading.Event()
        self._lost: str | None = None  # who took the lease over, once seen
        self._thread = threading.Thread(target=self._beat, name=f"batchdet-lease-{holder.run_id}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        return self.holder.run_id

    def _taken_by(self) -> str | None:
        """Who holds the output now if not this run (read from the store), else None."""
        generations = _generations(self.out)
        newest = generations[-1] if generations else None
        if newest is not None and newest > self.generation:
            other = _read(self.out, newest)
            return other.describe() if other else f"a run with lease generation {newest}"
        mine = _read(self.out, self.generation)
        if mine is None or mine.run_id != self.run_id:
            return mine.describe() if mine else "nobody: its lease record was deleted"
        return None

    def _beat(self) -> None:
        """Refresh the heartbeat until released or taken over; a failed write
        is logged and retried at the next beat (the limit allows several)."""
        while not self._stop.wait(self.limit_s / HEARTBEATS_PER_LIMIT):
            try:
                self._lost = self._lost or self._taken_by()
                if self._lost:
                    log.error("run %s lost its lease on %s to %s", self.run_id, self.out.url, self._lost)
                    return
                self._write(heartbeat=_now().isoformat())
            except Exception as e:  # noqa: BLE001 - a beat must never kill the run; the next one retries
                log.warning("lease heartbeat on %s failed: %s", self.out.url, one_line(e))

    def _write(self, **changes) -> None:
        """Write this run's record again with ``changes``. (Not atomic with the
        check before it: see the module's docstring for why that is safe.)"""
        self.holder = Holder(**{**asdict(self.holder), **changes})
        replace_bytes(self.out.fs, self.out.lease(self.generation), json.dumps(asdict(self.holder)).encode())

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease, as
        the store says now; called before anything is committed or recovered."""
        self._lost = self._lost or self._taken_by()
        if self._lost:
            raise LeaseLost(f"run {self.run_id} lost its lease on output {self.out.url} (held now by {self._lost}): "
                            "it commits nothing; its staged rows are left to a --resume")

    def release(self) -> None:
        """Stop the heartbeat and mark the record released, if it is still this
        run's and the highest (a record taken over is the new holder's to delete)."""
        self._stop.set()
        self._thread.join()
        try:
            if self._taken_by() is None:
                self._write(released=True)
        except Exception as e:  # noqa: BLE001 - the run's result stands; the lease just goes stale
            log.warning("could not release the lease on %s (%s: %s); it expires in %.0f s",
                        self.out.url, type(e).__name__, e, self.limit_s)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def current_holder(out: Output) -> Holder | None:
    """The record of the run holding ``out``'s lease now, None if no run holds it."""
    generations = _generations(out)
    current = _read(out, generations[-1]) if generations else None
    return None if current is None or current.released else current


def acquire(out: Output, run_id: str) -> Lease:
    """Take ``out``'s lease for ``run_id``, or raise ValueError naming the run that holds it.

    A dead holder's lease is taken over (the next generation is created,
    and the dead one's record deleted); its staging folder is then the new
    holder's to recover.
    """
    limit = stale_after_s()
    started = _now().isoformat()
    me = Holder(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), machine=_machine(),
                started=started, heartbeat=started)
    for _ in range(ATTEMPTS):
        generations = _generations(out)
        generation = generations[-1] + 1 if generations else 0
        current = _read(out, generations[-1]) if generations else None
        if generations and current is None:
            continue  # deleted while we looked (a new holder's clean-up): look again
        if current is not None and current.is_alive(limit):
            raise ValueError(f"output {out.url} is being written by {current.describe()}; wait for it or stop it")
        if _create(out, generation, me):
            for old in generations:
                try:
                    out.fs.rm_file(out.lease(old))
                except FileNotFoundError:
                    pass
            if current is not None and not current.released:
                log.info("took over the lease on %s from a dead run (%s)", out.url, current.describe())
            return Lease(out, generation, me, limit)
    raise ValueError(f"output {out.url}: could not take its lease, other runs kept changing it; try again")

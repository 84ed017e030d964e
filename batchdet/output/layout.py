"""An output's layout: every path rule, so the writer and every reader agree on it.

See docs/output.md. Committed rows live in Hive partitions
``dataset=<NAME>/<run_id>_<file>.parquet`` and each committed run has a
manifest ``_runs/<run_id>.json``; while a run works, its files are staged in
``_staging/<run_id>/dataset=<NAME>/`` beside a ``_run.json`` record, and the
run that writes holds ``_lease.<generation>.json``. :meth:`Output.data_files`
is the one rule for which files a reader sees: only files inside a
``dataset=`` partition, never staged, temporary or hidden ones.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

from batchdet.storage import filesystem

RUNS_DIR = "_runs"
STAGING_DIR = "_staging"
RUN_RECORD = "_run.json"
PARTITION = "dataset="
DATA_SUFFIX = ".parquet"
MANIFEST_SUFFIX = ".json"
LEASE_PREFIX = "_lease."
LEASE_SUFFIX = ".json"


def partition(dataset: str) -> str:
    """The partition folder of ``dataset``, as Hive-style readers recover the column from it."""
    return f"{PARTITION}{dataset}"


def dataset_of(path: str) -> str:
    """The dataset a data file (staged or committed) belongs to, from its partition folder's name."""
    return posixpath.basename(posixpath.dirname(path)).partition("=")[2]


def run_of(path: str) -> str:
    """The run that committed a data file: its name begins with the run id (see :func:`committed_name`)."""
    return posixpath.basename(path).split("_", 1)[0]


def manifest_run(path: str) -> str:
    """The run a manifest belongs to, from its file name."""
    return posixpath.basename(path).removesuffix(MANIFEST_SUFFIX)


def committed_name(run_id: str, staged: str) -> str:
    """Where a staged file of ``run_id`` is committed, relative to the output
    (run ids contain no ``_``, so :func:`run_of` reads it back)."""
    return f"{posixpath.basename(posixpath.dirname(staged))}/{run_id}_{posixpath.basename(staged)}"


def _is_hidden(name: str) -> bool:
    """Temporary and bookkeeping names (``.tmp…``, ``_staging``): the rule pyarrow's dataset discovery follows too."""
    return name.startswith((".", "_"))


class Output:
    """An output directory or prefix on any fsspec filesystem, and where each of its parts lives."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, root = filesystem(url, storage_options)
        self.root = root.rstrip("/")

    def join(self, *parts: str) -> str:
        """A path inside the output, as :attr:`fs` takes it."""
        return "/".join([self.root, *parts])

    # --- where things are written ---------------------------------------------------
    def staging(self, run_id: str) -> str:
        """The folder a run stages its files and record in until it is committed."""
        return self.join(STAGING_DIR, run_id)

    def staged_partition(self, run_id: str, dataset: str) -> str:
        """The folder a run's write tasks put ``dataset``'s files in."""
        return self.join(STAGING_DIR, run_id, partition(dataset))

    def new_staged_file(self, run_id: str, dataset: str) -> str:
        """A fresh name for one write task's file of ``dataset``: a retried task never overwrites one."""
        return f"{self.staged_partition(run_id, dataset)}/{uuid.uuid4().hex}{DATA_SUFFIX}"

    def run_record(self, run_id: str) -> str:
        """The record ``begin_run`` writes before any work; the commit builds the manifest from it."""
        return self.join(STAGING_DIR, run_id, RUN_RECORD)

    def manifest(self, run_id: str) -> str:
        """The manifest whose existence makes ``run_id`` committed."""
        return self.join(RUNS_DIR, f"{run_id}{MANIFEST_SUFFIX}")

    def lease(self, generation: int) -> str:
        """The lease record of ``generation`` (lease.py: the highest one is the current lease)."""
        return self.join(f"{LEASE_PREFIX}{generation}{LEASE_SUFFIX}")

    # --- what is there ----------------------------------------------------------------
    def data_files(self) -> list[str]:
        """THE discovery rule: committed data files, sorted — every ``*.parquet`` inside a
        ``dataset=<NAME>/`` partition, none whose path has a part starting with ``.`` or ``_``."""
        files = []
        for path in self.fs.find(self.root):
            parts = posixpath.relpath(path, self.root).split("/")
            if (len(parts) >= 2 and parts[0].startswith(PARTITION) and path.endswith(DATA_SUFFIX)
                    and not any(map(_is_hidden, parts))):
                files.append(path)
        return sorted(files)

    def manifest_files(self) -> list[str]:
        """Paths of the run manifests, sorted (not the writer's hidden temporaries)."""
        return sorted(p for p in self.fs.glob(self.join(RUNS_DIR, f"*{MANIFEST_SUFFIX}"))
                      if not posixpath.basename(p).startswith("."))

    def manifests(self) -> dict[str, dict]:
        """Committed runs: manifest contents by run id."""
        return {manifest_run(p): json.loads(self.fs.cat_file(p)) for p in self.manifest_files()}

    def staged_runs(self) -> list[str]:
        """Run ids with a staging folder: running now, or killed."""
        return sorted(posixpath.basename(p) for p in self.fs.glob(self.join(STAGING_DIR, "*")))

    def staged_files(self, run_id: str) -> list[str]:
        """The Parquet files a run's write tasks staged, sorted (whole or not)."""
        return sorted(p for p in self.fs.find(self.staging(run_id)) if p.endswith(DATA_SUFFIX))

    def lease_generations(self) -> list[int]:
        """The lease generations whose records are present, sorted (as listed: callers drop caches)."""
        found = []
        for p in self.fs.glob(self.join(f"{LEASE_PREFIX}*{LEASE_SUFFIX}")):
            middle = posixpath.basename(p)[len(LEASE_PREFIX): -len(LEASE_SUFFIX)]
            if middle.isdigit():
                found.append(int(middle))
        return sorted(found)

    def is_empty(self) -> bool:
        """No committed data, staged run or manifest: a run may start here without ``--resume``/``--overwrite``."""
        return not (self.data_files() or self.staged_runs() or self.manifests())

    def clear(self) -> None:
        """Remove everything batchdet wrote here (``--overwrite``)."""
        for path in self.fs.glob(self.join(f"{PARTITION}*")) + [self.join(RUNS_DIR), self.join(STAGING_DIR)]:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

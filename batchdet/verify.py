"""``batchdet verify``: is an output what its manifests say, and are its rows what
the recorded model makes of the bytes now at their URIs?

Two parts (docs/cli.md, "verify"):

* **Structure**, over every row and manifest: each committed manifest's files
  exist and read as Parquet; the rows of each run and dataset add up to the
  manifest's counts; every data file belongs to a committed run and holds only
  that run's rows; each image has exactly one current row; all runs share one
  set of result settings. Staged runs and leases are notes: the views leave
  them out, so they are not errors.
* **A sample** of current rows, re-done from scratch in this process: the
  bytes at each URI must still have the row's sha256 and size, and the
  recorded model (by sha256) with the recorded score threshold and pixel
  limit must give the same result, within :data:`SCORE_TOLERANCE` and
  :data:`BOX_TOLERANCE_PX`.

Every problem is a :class:`Mismatch` naming where (a URI, a file relative to
the output, a model path) and what differs; the command exits 1 if there is any.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import duckdb

from batchdet.errors import one_line
from batchdet.model.distribution import local_model, resolve_model, split_ref
from batchdet.model.spec import NMS_SCORE_THRESHOLD, PREPROCESSING_VERSION
from batchdet.options import DEFAULT_MAX_PIXELS
from batchdet.output.lease import current_holder
from batchdet.output.layout import RUNS_DIR, STAGING_DIR, Output, manifest_run, run_of
from batchdet.output.manifest import RunResult
from batchdet.output.query import Snapshot, aligned_lines, open_output, run_sql
from batchdet.output.schema import STATUS_OK
from batchdet.output.settings import ResultSettings
from batchdet.pipeline.detector import Detector, ImageDetections
from batchdet.pipeline.precision import Choice
from batchdet.pipeline.preprocess import ImageError
from batchdet.pipeline.reading import read_many
from batchdet.storage import full_uri

#: A re-detected score matches a stored one this close: another CPU or
#: onnxruntime build may sum float32 products in another order.
SCORE_TOLERANCE = 1e-3
#: A re-detected box corner matches a stored one this close, in pixels of the
#: original image, for the same reason (boxes are fractions times the image size).
BOX_TOLERANCE_PX = 1.0
#: Current rows re-detected by default: under a minute with the full model on two CPU threads.
DEFAULT_SAMPLE = 20
#: Mismatch lines :meth:`Verification.to_text` prints; the rest are counted.
MAX_SHOWN = 20
#: Images read at once (concurrently on object stores), bounding the bytes held.
READ_BATCH = 16
#: Error kinds of rows whose bytes were never read, so they record no sha256.
UNREAD_KINDS = frozenset({"ReadError", "FileTooLarge"})

# the checks, in the order the table shows them
MANIFESTS = "manifests readable"
FILES = "data files committed"
COUNTS = "row counts (run, dataset)"
CURRENT = "one current row per image"
SETTINGS = "one set of result settings"
BYTES = "sampled bytes unchanged"
MODEL = "recorded model (sha256)"
REDETECT = "sampled rows re-detected"
CHECKS = (MANIFESTS, FILES, COUNTS, CURRENT, SETTINGS, BYTES, MODEL, REDETECT)

#: A run's counts per dataset, as its manifest keeps them (writing.DatasetCounts)
#: and as the files' rows give them; older manifests lack some, compared where present.
COUNT_KEYS = ("images", "images_ok", "images_error", "gone", "detections", "copied")
FILE_COUNTS_SQL = """
    SELECT filename, dataset, run_id,
           count(*) FILTER (WHERE status = 'ok') AS images_ok,
           count(*) FILTER (WHERE status = 'error') AS images_error,
           count(*) FILTER (WHERE status = 'missing') AS gone,
           count(copied_from) AS copied,
           coalesce(sum(len(detections)), 0) AS detections
    FROM all_images GROUP BY ALL"""


@dataclass(frozen=True)
class Mismatch:
    """One thing that is not as the output claims."""

    check: str  # one of CHECKS
    where: str  # an image URI, a file relative to the output, or a model path
    what: str


@dataclass
class Verification:
    """What ``verify`` checked and found; ``ok`` when nothing differs."""

    output: str
    #: check → how many things it looked at (manifests, files, rows, models), in :data:`CHECKS` order
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    mismatches: list[Mismatch] = field(default_factory=list)
    #: what is there but is no error: staged runs, leases
    notes: list[str] = field(default_factory=list)
    #: sampled rows that cannot be checked, (uri, why): e.g. no content identity recorded
    unverifiable: list[tuple[str, str]] = field(default_factory=list)
    sample: int = 0  # rows asked for
    sampled: int = 0  # rows taken (fewer when the output holds fewer)
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_text(self, max_shown: int = MAX_SHOWN) -> str:
        """The report ``batchdet verify`` prints: the table, notes, then one line per mismatch."""
        problems = Counter(m.check for m in self.mismatches)
        rows = [[name, f"{n:,}", f"{problems[name]:,}"] for name, n in self.checked.items()]
        lines = [f"verify {self.output}", ""]
        lines += ["  " + line for line in aligned_lines(["check", "checked", "problems"], rows, {1, 2}, rule=True)]
        lines.append("")
        if self.sample:
            lines.append(f"sample: {self.sampled:,} current row(s) (--sample {self.sample}, --seed {self.seed} "
                         f"checks the same ones); tolerances: score ±{SCORE_TOLERANCE:g}, "
                         f"box corners ±{BOX_TOLERANCE_PX:g} px")
        else:
            lines.append("sample: none (--sample 0): no bytes read, nothing re-detected")
        for why, uris in _grouped(self.unverifiable).items():
            lines.append(f"unverifiable: {len(uris):,} sampled row(s): {why} (e.g. {uris[0]})")
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"MISMATCH {m.where}: {m.what}" for m in self.mismatches[:max_shown]]
        if len(self.mismatches) > max_shown:
            lines.append(f"… and {len(self.mismatches) - max_shown:,} more mismatch(es) not shown")
        lines.append(f"{len(self.mismatches):,} mismatch(es)" if self.mismatches else "OK: no mismatch")
        return "\n".join(lines) + "\n"


def _grouped(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(uri, why) pairs → {why: [uri, …]}, in first-seen order."""
    found: dict[str, list[str]] = {}
    for uri, why in pairs:
        found.setdefault(why, []).append(uri)
    return found


def verify(output: str, storage_options: dict[str, Any] | None = None, sample: int = DEFAULT_SAMPLE,
           seed: int | None = None, model: str | None = None) -> Verification:
    """Check ``output``'s structure, then re-detect ``sample`` random current rows.

    ``seed`` picks the same rows again (None: a random one, reported);
    ``model`` is a copy of the recorded model to use instead of the path in
    the manifests (its sha256 must still be the recorded one). An output that
    is not there, a negative ``sample`` or an unusable ``model`` raise
    ValueError/OSError; everything else is reported, not raised.
    """
    if sample < 0:
        raise ValueError(f"--sample must be >= 0, got {sample}")
    snapshot = open_output(output, storage_options)
    override = resolve_model(split_ref(model)[0], storage_options) if model else None
    report = Verification(output, sample=sample, seed=random.randrange(2**31) if seed is None else seed)
    checker = _Checker(snapshot.output, report, storage_options)
    manifests = checker.manifests()
    snapshot = checker.structure(snapshot, manifests)
    if sample:
        _Sampler(checker, manifests, override).run(snapshot)
    return report


class _Checker:
    """The structure checks of one output, adding to one report."""

    def __init__(self, out: Output, report: Verification, storage_options: dict[str, Any] | None):
        self.out, self.report, self.storage_options = out, report, storage_options
        #: the data files there are: as DuckDB names them (``filename``) → relative to the output
        self.names = {full_uri(out.fs, p): self.relative(p) for p in out.data_files()}

    def mismatch(self, check: str, where: str, what: str) -> None:
        self.report.mismatches.append(Mismatch(check, where, what))

    def relative(self, path: str) -> str:
        """A path of the output's filesystem as users name it: relative to the output."""
        return path[len(self.out.root) + 1:] if path.startswith(self.out.root + "/") else path

    def manifests(self) -> dict[str, RunResult]:
        """Readable manifests by run id; an unreadable one is a mismatch."""
        found = {}
        paths = self.out.manifest_files()
        for path in paths:
            try:
                record = json.loads(self.out.fs.cat_file(path))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                found[manifest_run(path)] = RunResult.from_dict(record, manifest_run(path))
            except (ValueError, TypeError, AttributeError, OSError) as e:
                self.mismatch(MANIFESTS, self.relative(path), f"unreadable manifest: {one_line(e)}")
        self.report.checked[MANIFESTS] = len(paths)
        return found

    def structure(self, snapshot: Snapshot, manifests: dict[str, RunResult]) -> Snapshot:
        """Run every structure check; return the snapshot of the readable data files."""
        listed = self._files(manifests)
        snapshot, groups = self._readable(snapshot)
        self._counts(manifests, listed, groups)
        self._current(snapshot)
        self._settings(manifests)
        self._notes()
        return snapshot

    def _files(self, manifests: dict[str, RunResult]) -> dict[str, str]:
        """Listed files against the data files there are; returns {listed file: its run}."""
        present = set(self.names.values())
        listed: dict[str, str] = {}
        for run_id, record in sorted(manifests.items()):
            for name in record.files:
                listed[name] = run_id
                if name not in present:
                    self.mismatch(FILES, name, f"listed in run {run_id}'s manifest but not there (deleted or moved)")
                elif run_of(name) != run_id:
                    self.mismatch(FILES, name, f"listed in run {run_id}'s manifest, but named as run {run_of(name)}'s")
        for name in sorted(present - set(listed)):
            run_id = run_of(name)
            self.mismatch(FILES, name, f"not among the files run {run_id}'s manifest lists" if run_id in manifests
                          else f"belongs to run {run_id}, which has no manifest: a run committing now, "
                               "or killed mid-commit (`detect --resume` commits its files)")
        self.report.checked[FILES] = len(present | set(listed))
        return listed

    def _readable(self, snapshot: Snapshot) -> tuple[Snapshot, list[dict]]:
        """Per data file, dataset and run id: the row counts. A file that does not
        read as Parquet is a mismatch and left out of every later check."""
        try:
            return snapshot, _file_counts(snapshot)
        except (ValueError, duckdb.Error):  # some file is bad: find which, one at a time
            pass
        readable = []
        for uri in snapshot.files:
            try:
                _file_counts(Snapshot(snapshot.output, (uri,)))
                readable.append(uri)
            except (ValueError, duckdb.Error) as e:
                self.mismatch(FILES, self.names.get(uri, uri), f"not readable as Parquet: {one_line(e, with_type=False)}")
        snapshot = Snapshot(snapshot.output, tuple(readable))
        return snapshot, _file_counts(snapshot)

    def _counts(self, manifests: dict[str, RunResult], listed: dict[str, str], groups: list[dict]) -> None:
        """Each run's rows per dataset, in the files its manifest lists, against its counts."""
        held: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for group in groups:
            name = self.names.get(group["filename"], group["filename"])
            if group["run_id"] != run_of(name):
                self.mismatch(FILES, name, f"holds {sum(group[k] for k in ('images_ok', 'images_error', 'gone')):,} "
                                           f"row(s) of run {group['run_id']}, but is named as run {run_of(name)}'s")
            if name in listed:
                counts = held[(listed[name], group["dataset"])]
                counts.update({k: group[k] for k in COUNT_KEYS if k in group})
                counts["images"] += group["images_ok"] + group["images_error"]
        pairs = {(run_id, d) for run_id, record in manifests.items() for d in record.datasets}
        for run_id, dataset in sorted(pairs | set(held)):
            recorded = manifests[run_id].datasets.get(dataset)
            where = f"{RUNS_DIR}/{run_id}.json"
            if recorded is None:
                self.mismatch(COUNTS, where, f"its files hold rows of dataset {dataset}, which it does not count")
                continue
            got = held[(run_id, dataset)]
            differ = [f"{k} {getattr(recorded, k):,} in the manifest, {got[k]:,} in its files"
                      for k in COUNT_KEYS if getattr(recorded, k) != got[k]]
            if differ:
                self.mismatch(COUNTS, where, f"dataset {dataset}: {'; '.join(differ)}")
        self.report.checked[COUNTS] = len(pairs | set(held))

    def _current(self, snapshot: Snapshot) -> None:
        """No image with two current rows (two rows of its latest run)."""
        con = snapshot.connect()
        twice = run_sql(con, "SELECT dataset, uri, run_id, count(*) AS n FROM images "
                             "GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL").to_pylist()
        for row in twice:
            self.mismatch(CURRENT, row["uri"], f"{row['n']} current rows in dataset {row['dataset']}, "
                                               f"all of run {row['run_id']}")
        (images,) = con.execute("SELECT count(DISTINCT (dataset, uri)) FROM images").fetchone()
        self.report.checked[CURRENT] = images

    def _settings(self, manifests: dict[str, RunResult]) -> None:
        """Every run's result settings equal the first run's."""
        settings = {}
        for run_id, record in sorted(manifests.items()):
            try:
                settings[run_id] = ResultSettings.of_run(record.settings, record.model, record.arguments)
            except (TypeError, ValueError) as e:
                self.mismatch(SETTINGS, f"{RUNS_DIR}/{run_id}.json", f"no readable result settings: {one_line(e)}")
        if settings:
            first = min(settings)
            for run_id, theirs in sorted(settings.items()):
                differ = theirs.differences(settings[first])
                if differ:
                    self.mismatch(SETTINGS, f"{RUNS_DIR}/{run_id}.json",
                                  f"result settings differ from run {first}'s: {'; '.join(differ)}")
        self.report.checked[SETTINGS] = len(manifests)

    def _notes(self) -> None:
        """What a reader leaves out, so it is no error: staged runs and the lease."""
        for run_id in self.out.staged_runs():
            self.report.notes.append(f"{STAGING_DIR}/{run_id}/: run {run_id} is running now or was killed "
                                     "(its staged rows are in no view; `detect --resume` commits them)")
        holder = current_holder(self.out)
        if holder is not None:
            self.report.notes.append(f"the output's lease is held by {holder.describe()}: "
                                     "a run writing now may add files while this checks")


def _file_counts(snapshot: Snapshot) -> list[dict]:
    """:data:`FILE_COUNTS_SQL` over ``snapshot``: reads every row's status and detection count."""
    return run_sql(snapshot.connect(provenance=True), FILE_COUNTS_SQL).to_pylist()


class _Sampler:
    """Re-detects a random sample of current rows and compares, adding to the checker's report."""

    def __init__(self, checker: _Checker, manifests: dict[str, RunResult], override: Any):
        """``override``: the ModelInfo of ``--model``, or None to use each run's recorded model."""
        self.checker, self.manifests, self.override = checker, manifests, override
        self.report = checker.report
        self.detectors: dict[tuple, Detector | None] = {}  # by (model, threshold, max pixels)
        #: model location → ModelInfo, or None when it could not be read
        self.models: dict[str, Any] = {split_ref(override.path)[0]: override} if override else {}

    def run(self, snapshot: Snapshot) -> None:
        # ORDER BY a seeded hash rather than a reservoir sample: the same seed
        # picks the same rows whatever DuckDB's thread count or the file order.
        rows = run_sql(snapshot.connect(), "SELECT dataset, uri, run_id, status, error, width, height, detections, "
                                           "size, sha256 FROM images ORDER BY hash(dataset, uri, ?::BIGINT), "
                                           "dataset, uri LIMIT ?", [self.report.seed, self.report.sample]).to_pylist()
        self.report.sampled = len(rows)
        for start in range(0, len(rows), READ_BATCH):
            batch = rows[start: start + READ_BATCH]
            for row, data in zip(batch, read_many([r["uri"] for r in batch], self.checker.storage_options)):
                self._check(row, data)
        self.report.checked[MODEL] = len(self.models)

    def _check(self, row: dict, data: bytes | ImageError) -> None:
        """One sampled row: its bytes, then its re-detection."""
        uri, run_id = row["uri"], row["run_id"]
        if row["sha256"] is None and _error_kind(row["error"]) not in UNREAD_KINDS:
            self.report.unverifiable.append((uri, "no content identity (sha256) recorded: written by an older "
                                                  "batchdet"))
            return
        if row["sha256"] is not None:
            self.report.checked[BYTES] += 1
            if isinstance(data, ImageError):
                self.checker.mismatch(BYTES, uri, f"bytes changed since run {run_id}: now {data}")
                return
            now = hashlib.sha256(data).hexdigest()
            if (now, len(data)) != (row["sha256"], row["size"]):
                self.checker.mismatch(BYTES, uri, f"bytes changed since run {run_id}: sha256 {row['sha256'][:12]}… "
                                                  f"({row['size']:,} bytes) then, {now[:12]}… ({len(data):,} bytes) now")
                return
        record = self.manifests.get(run_id)
        if record is None:
            self.report.unverifiable.append((uri, f"run {run_id} has no manifest: its model is not known"))
            return
        settings = ResultSettings.of_run(record.settings, record.model, record.arguments)
        if settings.preprocessing != PREPROCESSING_VERSION:
            self.report.unverifiable.append((uri, f"made with preprocessing version {settings.preprocessing}, "
                                                  f"this batchdet's is {PREPROCESSING_VERSION}"))
            return
        detector = self._detector(run_id, record, settings)
        if detector is None:
            return  # the model's mismatch is reported once
        self.report.checked[REDETECT] += 1
        differs = compare(row, redetect(detector, data), detector.score_threshold)
        if differs:
            self.checker.mismatch(REDETECT, uri, f"{differs} (run {run_id})")

    def _detector(self, run_id: str, record: RunResult, settings: ResultSettings) -> Detector | None:
        """The recorded model (or ``--model``) with the run's settings, or None when its
        sha256 is not the recorded one or it cannot be read (a mismatch, reported once)."""
        info = self.override or self._model(record.model.get("path"), run_id)
        if info is None:
            return None
        threshold = NMS_SCORE_THRESHOLD if settings.score_threshold is None else settings.score_threshold
        max_pixels = DEFAULT_MAX_PIXELS if settings.max_pixels is None else settings.max_pixels
        choice = Choice(settings.engine, settings.precision)  # the rows' arithmetic, not this machine's default
        key = (info.path, settings.model_sha256, threshold, max_pixels, choice)
        if key not in self.detectors:
            where = split_ref(info.path)[0]
            self.detectors[key] = None
            if info.sha256 != settings.model_sha256:
                self.checker.mismatch(MODEL, where, f"model at {where} has sha256 {info.sha256}, "
                                                    f"rows were made with {settings.model_sha256}")
                return None
            local = local_model(info.path, storage_options=self.checker.storage_options)  # a URL's cached copy
            try:
                self.detectors[key] = detector = Detector(local, score_threshold=threshold, max_pixels=max_pixels,
                                                          checked=True, choice=choice)
                # what actually ran, so a reader (and a test) can see the rows' own arithmetic was used
                self.report.notes.append(f"rows made by {choice.engine} at {choice.precision} are re-detected by "
                                         f"{detector.backend.name} {detector.backend.version}")
            except ValueError as e:  # e.g. bf16 rows on a CPU without bf16, OpenVINO not installed
                self.checker.mismatch(MODEL, where, f"run {run_id}'s rows were made by {choice.engine} at "
                                                    f"{choice.precision}, which cannot run here: {one_line(e)}")
        return self.detectors[key]

    def _model(self, recorded: str | None, run_id: str) -> Any:
        """The ModelInfo of the file now at a run's recorded model path (a URL's
        ``#sha256=`` pin dropped: what is there now is what is checked), or None."""
        location = split_ref(recorded)[0] if recorded else f"{RUNS_DIR}/{run_id}.json"
        if location not in self.models:
            self.models[location] = None
            if not recorded:
                self.checker.mismatch(MODEL, location, "records no model path: pass --model PATH")
            else:
                try:
                    self.models[location] = resolve_model(location, self.checker.storage_options)
                except (ValueError, OSError) as e:
                    self.checker.mismatch(MODEL, location, f"run {run_id}'s model cannot be used: {one_line(e)}; "
                                                           "pass --model PATH to a copy of it")
        return self.models[location]


def redetect(detector: Detector, data: bytes | ImageError) -> ImageDetections | ImageError:
    """What the pipeline would write for these bytes now: detections, or the error (a read error stays one)."""
    if isinstance(data, ImageError):
        return data
    try:
        return detector.detect(data)
    except ImageError as e:
        return e
    except ValueError as e:  # postprocess: labels outside the contract, as the inference stage reports it
        return ImageError("ModelOutputError", str(e))


def _error_kind(error: str | None) -> str | None:
    """``DecodeError`` of ``DecodeError: cannot identify image``: the text before the first ':'."""
    return None if error is None else error.split(":", 1)[0].strip()


def compare(row: dict, now: ImageDetections | ImageError, score_threshold: float) -> str | None:
    """What differs between a stored row and its re-detection, in one phrase, or None.

    Status must agree; an error row must fail with the same error kind (the
    message may name a path or a library's wording); an ok row must have the
    same width and height and detections matched one to one (:func:`match_detections`).
    """
    if isinstance(now, ImageError):
        if row["status"] == STATUS_OK:
            return f"the row is ok, re-detection fails: {now}"
        if now.kind != _error_kind(row["error"]):
            return f"the row's error is {row['error']!r}, re-detection's {str(now)!r}"
        return None
    if row["status"] != STATUS_OK:
        return f"the row's error is {row['error']!r}, re-detection succeeds ({len(now.detections)} detections)"
    if (row["width"], row["height"]) != (now.width, now.height):
        return f"size {row['width']}x{row['height']} in the row, {now.width}x{now.height} re-detected"
    return _describe(*match_detections(row["detections"] or [], now.detections, score_threshold),
                     total=len(row["detections"] or []))


def _distance(a: dict, b: dict) -> tuple[float, float]:
    """(largest corner difference in pixels, score difference) of two detections."""
    return (max(abs(a[k] - b[k]) for k in ("x_min", "y_min", "x_max", "y_max")), abs(a["score"] - b["score"]))


def match_detections(recorded: list[dict], found: list[dict], score_threshold: float = NMS_SCORE_THRESHOLD
                     ) -> tuple[list[dict], list[dict]]:
    """Pair stored and re-detected detections one to one; return the unpaired of each.

    A pair has the same label, scores within :data:`SCORE_TOLERANCE` and every
    corner within :data:`BOX_TOLERANCE_PX`. Greedy over the stored ones in
    their order, each taking its closest candidate, so two near-equal scores
    that swapped places still pair. A detection scoring within the tolerance
    of the threshold may fall on either side of it, so it need not be paired.
    """
    left = list(found)
    unpaired = []
    for d in recorded:
        close = [(_distance(d, f), i) for i, f in enumerate(left) if f["label_id"] == d["label_id"]]
        close = [(dist, i) for dist, i in close if dist[0] <= BOX_TOLERANCE_PX and dist[1] <= SCORE_TOLERANCE]
        if close:
            left.pop(min(close)[1])
        else:
            unpaired.append(d)

    def required(d: dict) -> bool:
        return d["score"] >= score_threshold + SCORE_TOLERANCE

    return [d for d in unpaired if required(d)], [f for f in left if required(f)]


def _text(d: dict) -> str:
    return (f"{d['label']} {d['score']:.4f} at ({d['x_min']:.1f}, {d['y_min']:.1f}, "
            f"{d['x_max']:.1f}, {d['y_max']:.1f})")


def _describe(stored: list[dict], found: list[dict], total: int, shown: int = 2) -> str | None:
    """The unpaired detections as one phrase: each stored one beside the closest
    re-detected one of its label, then re-detected ones the row lacks."""
    found = list(found)
    parts = []
    for d in stored:
        same = [(_distance(d, f), i) for i, f in enumerate(found) if f["label_id"] == d["label_id"]]
        if same:
            parts.append(f"row has {_text(d)}, re-detection {_text(found.pop(min(same)[1]))}")
        else:
            parts.append(f"row has {_text(d)}, not re-detected")
    parts += [f"re-detection has {_text(f)}, not in the row" for f in found]
    if not parts:
        return None
    more = f"; and {len(parts) - shown} more" if len(parts) > shown else ""
    return f"{len(parts)} detection(s) differ of {total} in the row: {'; '.join(parts[:shown])}{more}"

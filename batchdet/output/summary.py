"""What an output holds, at a glance: per-dataset counts and the runs that wrote it.

Counts come from the Parquet rows themselves through the ``images`` view (one
row per image: the latest run's), not from the manifests, so they stay right
when ``--resume`` retried failed images, and they include rows of a run that
was killed before writing its manifest (listed separately).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchdet.errors import one_line
from batchdet.model.spec import OFFICIAL, OFFICIAL_INT8, OTHER, STANDIN
from batchdet.output.layout import manifest_run
from batchdet.output.manifest import RunResult
from batchdet.output.query import aligned_lines, open_output, run_sql
from batchdet.output.schema import STATUS_MISSING


@dataclass
class DatasetSummary:
    name: str
    images: int
    ok: int
    errors: int
    detections: int
    #: (label, count) at score >= the summary's ``min_score``, most frequent first.
    top_classes: list[tuple[str, int]] = field(default_factory=list)
    #: Images an earlier run had rows for that the latest listing no longer holds.
    gone: int = 0
    #: Rows whose detections were copied from a row of the same bytes (no model run).
    copied: int = 0


@dataclass
class Summary:
    output: str
    min_score: float
    datasets: list[DatasetSummary]
    runs: list[RunResult]  # from the manifests, oldest first
    #: Rows a later run replaced for the same image (kept in the ``all_images`` view).
    superseded_rows: int = 0
    #: Run ids that have rows but no manifest: running now, or killed before committing.
    runs_without_manifest: list[str] = field(default_factory=list)
    #: Manifests that could not be read (name: reason); the rest are still summarized.
    unreadable_runs: dict[str, str] = field(default_factory=dict)


def summarize(output: str, storage_options: dict[str, Any] | None = None,
              min_score: float = 0.5, top: int = 5) -> Summary:
    """Counts per dataset and the recorded runs of ``output``.

    ``min_score`` is compared as float32, the type of ``score``, so 0.9 counts a stored 0.9.
    """
    snapshot = open_output(output, storage_options)
    con = snapshot.connect()
    counts = run_sql(con, """
        SELECT dataset, count(*) AS images,
               count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status = 'error') AS errors,
               count(*) FILTER (WHERE copied_from IS NOT NULL) AS copied,
               coalesce(sum(len(detections)), 0) AS detections
        FROM images GROUP BY dataset ORDER BY dataset""").to_pylist()
    classes = run_sql(con, """
        SELECT dataset, label, count(*) AS n FROM detections WHERE score >= CAST(? AS FLOAT)
        GROUP BY dataset, label ORDER BY dataset, n DESC, label""", [min_score]).to_pylist()
    gone = dict(con.execute(f"SELECT dataset, count(*) FROM latest_rows WHERE status = '{STATUS_MISSING}' "
                            "GROUP BY dataset").fetchall())
    by_name = {c["dataset"]: DatasetSummary(name=c["dataset"], images=c["images"], ok=c["ok"], errors=c["errors"],
                                            detections=int(c["detections"]), copied=c["copied"]) for c in counts}
    for name, n in gone.items():
        by_name.setdefault(name, DatasetSummary(name, 0, 0, 0, 0)).gone = n
    datasets = [by_name[name] for name in sorted(by_name)]
    for c in classes:
        if len(by_name[c["dataset"]].top_classes) < top:
            by_name[c["dataset"]].top_classes.append((c["label"], c["n"]))

    (superseded,) = con.execute(
        "SELECT (SELECT count(*) FROM all_images) - (SELECT count(*) FROM latest_rows)").fetchall()[0]
    row_runs = {r for (r,) in con.execute("SELECT DISTINCT run_id FROM all_images").fetchall()}

    runs, unreadable = [], {}
    for path in snapshot.output.manifest_files():
        name = path.rsplit("/", 1)[-1]
        try:
            with snapshot.output.fs.open(path, "r") as f:
                runs.append(RunResult.from_dict(json.load(f), manifest_run(path)))
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            unreadable[name] = one_line(e)
    runs.sort(key=lambda r: (r.finished or r.started or "", r.run_id))
    recorded = {r.run_id for r in runs} | {manifest_run(name) for name in unreadable}
    return Summary(output, min_score, datasets, runs, superseded, sorted(row_runs - recorded), unreadable)


def render_summary(summary: Summary) -> str:
    """The text ``batchdet summary`` prints."""
    lines = [f"output {summary.output}", ""]
    rows = [[d.name, f"{d.images:,}", f"{d.ok:,}", f"{d.errors:,}", f"{d.gone:,}", f"{d.copied:,}",
             f"{d.detections:,}", ", ".join(f"{label} {n:,}" for label, n in d.top_classes) or "-"]
            for d in summary.datasets]
    lines += aligned_lines(["dataset", "images", "ok", "errors", "gone", "copied", "detections",
                            f"top classes (score >= {summary.min_score:g})"], rows, right={1, 2, 3, 4, 5, 6})
    if not summary.datasets:
        lines.append("(no images yet)")
    if summary.superseded_rows:
        lines.append(f"{summary.superseded_rows:,} older rows were replaced by a later run's row for the same image "
                     "(view all_images keeps them)")
    if any(d.gone for d in summary.datasets):
        lines.append("gone: images an earlier run listed that the latest --resume no longer found "
                     "(a 'missing' row each; not in images, eval or draw)")
    if any(d.copied for d in summary.datasets):
        lines.append("copied: rows whose detections were copied from a row of the same bytes (sha256), "
                     "not computed again (column copied_from)")
    lines += ["", f"runs ({len(summary.runs)})"]
    rows = [[r.run_id, (r.finished or "-") + (" (recovered)" if r.recovered else ""), _model_kind(r),
             _fmt(r.wall_s, ".1f"), _fmt(r.images_per_s, ".2f"), ", ".join(sorted(r.datasets))]
            for r in summary.runs]
    lines += aligned_lines(["run id", "finished", "model", "wall s", "images/s", "datasets"], rows, right={3, 4})
    if summary.runs_without_manifest:
        lines.append(f"rows without a manifest from {', '.join(summary.runs_without_manifest)}: running now, or "
                     "killed before committing (detect --resume commits what it staged)")
    elif not summary.runs:
        lines.append("(no run manifests)")
    for name, reason in summary.unreadable_runs.items():
        lines.append(f"unreadable manifest {name}: {reason}")
    kinds = {r.kind for r in summary.runs}
    notes = [note for kind, note in _NOTES.items() if kind in kinds]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


#: the model column: what the manifest's kind says, else whether it was the official file
_LABELS = {OFFICIAL: "official", OFFICIAL_INT8: "official INT8", STANDIN: "stand-in", OTHER: "other"}
_NOTES = {
    STANDIN: "NOTE: runs marked stand-in used made-up weights; their detections mean nothing.",
    OFFICIAL_INT8: "NOTE: runs marked official INT8 used an INT8 copy of the official weights; "
                   "check its accuracy with `batchdet eval`.",
    OTHER: "NOTE: runs marked other used a model that is not the official file; its accuracy is unknown.",
}


def _model_kind(run: RunResult) -> str:
    if run.kind in _LABELS:
        return _LABELS[run.kind]
    return "unknown" if run.official is None else "official" if run.official else "unofficial"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)

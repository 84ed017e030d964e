"""The run manifest, ``_runs/<run_id>.json``: one type that the commit writes
and every reader (``summary``, ``verify``) reads, this version's and older ones'.

Its keys are documented in docs/output.md ("Run manifest").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from batchdet.model.spec import OFFICIAL, kind_id_from_text


@dataclass
class DatasetCounts:
    """One dataset's part of a run: what its listing held, what was done, what was written."""

    url: str = ""
    images: int = 0  # rows written for images processed (ok + error)
    images_ok: int = 0
    images_error: int = 0
    detections: int = 0
    skipped_files: int = 0  # files under the URL that are not images
    already_done: int = 0  # images --resume found unchanged with an ok row, and did not read
    listing_seconds: float = 0.0
    new: int = 0  # images without a current row (all of them in a fresh output)
    changed: int = 0  # images with an ok row whose size/version differs or could not be told
    retried: int = 0  # images whose current row was an error
    gone: int = 0  # current rows no longer listed: a 'missing' row each
    copied: int = 0  # rows whose detections were copied from a row of the same bytes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetCounts":
        """From a manifest or run record; keys an older version did not write keep their defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


@dataclass
class RunResult:
    """A committed run: exactly what its manifest says (the one type that writes and reads it)."""

    run_id: str
    output: str | None
    started: str | None
    finished: str | None
    wall_s: float | None
    images_per_s: float | None
    datasets: dict[str, DatasetCounts]
    model: dict[str, Any]
    arguments: dict[str, Any]
    versions: dict[str, str]
    files: list[str] = field(default_factory=list)
    recovered: bool = False  # committed by a later --resume after the run was killed
    settings: dict[str, Any] = field(default_factory=dict)  # output.settings.ResultSettings
    ran_twice: int = 0  # images whose bytes the model ran on more than once in this run (in different actors)
    execution: str | None = None  # "in-process" or "ray" (None: nothing to process, or not recorded)
    timings: dict[str, float] = field(default_factory=dict)  # seconds since the run began, per step (api.Timings)
    # what ran the model: name, version, precision; for another engine than onnxruntime also its
    # "speedup" over it (pipeline.speedup.Speedup), "speedup_text", and "speedup_measured" (True: by
    # this run, the first of its kind on its CPU; False: remembered from an earlier one)
    engine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], run_id: str | None = None) -> "RunResult":
        """A manifest's contents, as this or an older version wrote them (times as
        epoch seconds, keys missing); ``run_id`` (from the file name) where it has none.
        TypeError, ValueError or AttributeError for a manifest that is no mapping of them."""
        model = d.get("model") or {}
        return cls(
            run_id=str(d.get("run_id") or run_id), output=d.get("output"),
            started=_time_text(d.get("started")), finished=_time_text(d.get("finished")),
            wall_s=_number(d.get("wall_s")), images_per_s=_number(d.get("images_per_s")),
            datasets={name: DatasetCounts.from_dict(c) for name, c in (d.get("datasets") or {}).items()},
            model=dict(model), arguments=d.get("arguments") or {}, versions=d.get("versions") or {},
            files=list(d.get("files") or []), recovered=bool(d.get("recovered")),
            settings=d.get("settings") or {}, ran_twice=int(d.get("ran_twice") or 0),
            execution=d.get("execution"), timings=d.get("timings") or {}, engine=d.get("engine") or {},
        )

    @property
    def official(self) -> bool | None:
        """True for the official MLPerf file, False for any other, None if not recorded."""
        official = self.model.get("official")
        return None if official is None else bool(official)

    @property
    def kind(self) -> str | None:
        """``spec.ModelInfo.kind_id`` of the run's model, read from the manifest
        (older ones only have the kind's text, or whether it was official); None if not recorded."""
        return (self.model.get("kind_id") or (OFFICIAL if self.official else None)
                or kind_id_from_text(self.model.get("kind")))

    def to_text(self) -> str:
        """The end-of-run summary a person reads."""
        lines = [f"run {self.run_id} -> {self.output}",
                 f"  {'dataset':<20} {'images':>8} {'ok':>8} {'errors':>8} {'detections':>11} {'unchanged':>10}"
                 f" {'new':>8} {'changed':>8} {'gone':>8} {'copied':>8}"]
        for name, c in self.datasets.items():
            lines.append(f"  {name:<20} {c.images:>8} {c.images_ok:>8} {c.images_error:>8} {c.detections:>11}"
                         f" {c.already_done:>10} {c.new:>8} {c.changed:>8} {c.gone:>8} {c.copied:>8}")
        total = sum(c.images for c in self.datasets.values())
        if self.wall_s is not None:
            where = f" ({self.execution})" if self.execution else ""
            lines.append(f"  {total} images in {self.wall_s:.1f} s = {self.images_per_s:.2f} images/s{where}")
        if any(c.copied for c in self.datasets.values()) or self.ran_twice:
            lines.append(f"  copied: detections of the same bytes (sha256) already computed, not run again; "
                         f"ran twice in different actors: {self.ran_twice}")
        lines.append(f"  model: {self.model.get('kind', 'kind not recorded')}, sha256 {self.model.get('sha256', '')[:12]}")
        if self.engine:
            lines.append(f"  engine: {self.engine.get('name')} {self.engine.get('version', '')}, "
                         f"precision {self.engine.get('precision')}")
        if self.engine.get("speedup_measured"):  # once per model, engine and CPU: later runs reuse it silently
            lines.append(f"  speed: {self.engine.get('speedup_text')}")
        return "\n".join(lines)


def _time_text(value: Any) -> str | None:
    """Manifest times as ISO text, whether recorded as text or as epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
    return None if value is None else str(value)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)

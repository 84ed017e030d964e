"""A row's result settings: everything besides the image that decides its detections.

Two rows of one image agree only if the model (by sha256), the score
threshold, the pixel limit, batchdet's preprocessing, the engine and the
precision it ran at were the same (bf16 or another engine's kernels move
scores in their last digits, and boxes with them). Each
run records them in its manifest (``settings``); ``--resume`` refuses to add
rows made with other settings than the output's, so no output ever mixes
them in its current rows (docs/output.md, "Result settings").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from batchdet.model.spec import PREPROCESSING_VERSION
from batchdet.output.layout import Output


@dataclass(frozen=True)
class ResultSettings:
    """What a run's rows depend on besides the images themselves."""

    model_sha256: str
    score_threshold: float | None  # None: not recorded (an older run's), never compared
    max_pixels: int | None
    preprocessing: int = PREPROCESSING_VERSION
    # runs written before batchdet had --precision and --engine ran onnxruntime at fp32
    engine: str = "onnxruntime"
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ResultSettings":
        """The settings of a manifest or staged run record. Records written before
        batchdet kept ``settings`` give what they can through their model and
        arguments, and were made with preprocessing version 1."""
        return cls.of_run(record.get("settings"), record.get("model"), record.get("arguments"))

    @classmethod
    def of_run(cls, settings: Any, model: Any, arguments: Any) -> "ResultSettings":
        """From a run's recorded ``settings``, else (older runs) its ``model`` and ``arguments``."""
        if isinstance(settings, dict) and settings:
            return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})
        arguments = arguments if isinstance(arguments, dict) else {}
        return cls(model_sha256=str((model or {}).get("sha256")),
                   score_threshold=arguments.get("score_threshold"), max_pixels=arguments.get("max_pixels"),
                   preprocessing=1)

    def differences(self, other: "ResultSettings") -> list[str]:
        """One phrase per setting where ``self`` (this run) differs from ``other`` (the output's)."""
        phrases = {
            "model_sha256": lambda mine, theirs: f"--model has sha256 {mine[:12]}…, the output's {theirs[:12]}…",
            "score_threshold": lambda mine, theirs: f"--score-threshold {mine:g} (the output's: {theirs:g})",
            "max_pixels": lambda mine, theirs: f"--max-pixels {mine:,} (the output's: {theirs:,})",
            "preprocessing": lambda mine, theirs: (f"batchdet's preprocessing is version {mine}, "
                                                   f"the output's rows were made with version {theirs}"),
            "engine": lambda mine, theirs: f"--engine {mine} (the output's: {theirs})",
            "precision": lambda mine, theirs: f"--precision {mine} (the output's: {theirs})",
        }
        return [phrases[f.name](getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if None not in (getattr(self, f.name), getattr(other, f.name))
                and getattr(self, f.name) != getattr(other, f.name)]


def recorded_settings(out: Output) -> dict[str, ResultSettings]:
    """The settings of every run whose rows are or may become the output's:
    committed runs (manifests) and killed ones (staged records), by run id."""
    found = {run_id: ResultSettings.from_record(m) for run_id, m in out.manifests().items()}
    for run_id in out.staged_runs():
        if out.fs.exists(out.run_record(run_id)):
            found[run_id] = ResultSettings.from_record(json.loads(out.fs.cat_file(out.run_record(run_id))))
    return found


def check_same_settings(out: Output, settings: ResultSettings) -> None:
    """Refuse, in one line, to resume ``out`` with other result settings than its
    runs': naming each setting that differs, both values, and the way out."""
    for run_id, theirs in sorted(recorded_settings(out).items()):
        differ = settings.differences(theirs)
        if differ:
            raise ValueError(f"cannot --resume {out.url} with other result settings than its run {run_id}: "
                             f"{'; '.join(differ)}. Rows made both ways would mix: pass --overwrite to "
                             "replace the output's results, or write to a new output")

"""Training as a background job a view can watch and cancel.

A :class:`TrainingJob` runs :func:`core.pipeline.train_run` (or registers a saved model) in a thread. Its
progress callback records every stage's progress and raises :class:`core.Cancelled` once ``cancel()`` was
called, so a cancelled run stops at its next progress report and, as the pipeline guarantees, registers
nothing. Views poll :meth:`TrainingJob.snapshot`; they never share the thread's mutable state.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .. import Cancelled
from ..data import ImageSet
from ..detectors import load_detector
from ..pipeline import register_fitted, train_run
from ..runs import RunStore

# Stage names as detectors report them, worded for people.
STAGE_LABELS = {"features": "Extracting features", "coreset": "Selecting the coreset",
                "score": "Scoring the test set", "load": "Loading images", "train": "Training epochs",
                "epoch": "Training epochs", "gaussians": "Fitting the Gaussians",
                "layout": "Laying out the maps (UMAP)",
                "auto settings": "Choosing settings on held-out images with synthetic defects",
                "calibration": "Scoring held-out good images and synthetic defects (for thresholds)",
                "audit": "Auditing the training images (each scored by a model fitted without it)"}


@dataclass
class StageProgress:
    stage: str
    done: int
    total: int

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage.capitalize())

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass
class JobSnapshot:
    """A consistent copy of a job's state for a view to draw."""
    status: str                      # "running", "done", "cancelled" or "failed"
    stages: list[StageProgress]
    run_id: int | None
    error: str | None
    seconds: float


@dataclass
class TrainingJob:
    """Train (or register a saved model) in a background thread; see the module docstring."""
    store: RunStore
    dataset_id: int
    dataset: ImageSet
    detector: str | None = None          # train this detector with `params` ...
    params: dict = field(default_factory=dict)
    model_folder: str | Path | None = None   # ... or register this saved model instead
    name: str | None = None
    audit: str = "off"                   # "flag" or "drop" suspicious training images (core.pipeline.train_run)

    def __post_init__(self):
        if (self.detector is None) == (self.model_folder is None):
            raise ValueError("give either a detector to train or a saved model folder, not both")
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._stages: dict[str, StageProgress] = {}
        self._status = "running"
        self._run_id: int | None = None
        self._error: str | None = None
        self._start = time.perf_counter()
        self._end: float | None = None
        self._thread = threading.Thread(target=self._work, name=f"training-{self.detector or 'load'}", daemon=True)

    def start(self) -> "TrainingJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        self._thread.join(timeout)
        return self.snapshot()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            end = self._end if self._end is not None else time.perf_counter()
            return JobSnapshot(self._status, [StageProgress(s.stage, s.done, s.total) for s in self._stages.values()],
                               self._run_id, self._error, end - self._start)

    def _progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            self._stages[stage] = StageProgress(stage, done, total)
        if self._cancel.is_set():
            raise Cancelled(f"cancelled during {stage}")

    def _work(self) -> None:
        try:
            if self.model_folder is not None:
                det = load_detector(self.model_folder)
                run_id = register_fitted(self.store, self.dataset_id, self.dataset, det, self._progress, self.name)
            else:
                run_id = train_run(self.store, self.dataset_id, self.dataset, self.detector, self.params,
                                   self._progress, self.name, audit=self.audit)
            status, error = "done", None
        except Cancelled:
            run_id, status, error = None, "cancelled", None
        except Exception as exc:  # noqa: BLE001 - shown to the user; the traceback goes to the server log
            traceback.print_exc()
            run_id, status, error = None, "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._run_id, self._status, self._error, self._end = run_id, status, error, time.perf_counter()


def chosen_settings(card: dict) -> list[str]:
    """What a fit decided from the data itself, in words, from a run's model card."""
    lines = []
    frame, stretch = card.get("input_frame_hw"), card.get("aspect_stretch")
    auto = card.get("auto_settings", {})
    if frame:
        resize = card.get("params", {}).get("resize")
        how = ("the candidates compared on held-out images (below)" if resize == "auto" and "long_side" in auto
               else "the training images' own size" if resize == "auto" else "the training images' aspect ratio"
               if isinstance(resize, int) else "as set")
        line = f"Input frame {frame[0]} x {frame[1]} px (H x W), from {how}"
        if stretch and stretch > 1.05:
            line += f"; the most off-shape training image is stretched {stretch:.2f}x to fit it"
        lines.append(line + ".")
    bank = card.get("memory_bank")
    if bank:
        share = bank["patches"] / max(bank["from_training_patches"], 1)
        lines.append(f"Memory bank: {bank['patches']:,} of {bank['from_training_patches']:,} training patches "
                     f"({share:.1%}), nearest-neighbour search {bank.get('search', 'exact')}.")
    if auto.get("why"):
        lines.append(f"Chosen automatically: {auto['why']}.")
    return lines

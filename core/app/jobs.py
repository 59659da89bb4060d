"""Long work (training, registering a saved model, feature maps) as server-side jobs any page can watch.

A :class:`Job` runs in a thread of the server process and lives on the :class:`JobBoard` of its registry, not
in a browser tab: a reload, another tab or another page finds it again, shows its progress and can cancel it.
Its progress callback records every stage and raises :class:`core.Cancelled` once ``cancel()`` was called,
so a cancelled job stops at its next progress report (a training, as the pipeline guarantees, registering
nothing). Views poll :meth:`Job.snapshot`; they never share the thread's mutable state.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .. import Cancelled
from ..data import ImageSet
from ..detectors import load_detector
from ..pipeline import register_fitted, train_run
from ..runs import RunStore, to_json
from .embeddings import compute_views, save_views

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
    seconds: float = 0.0     # since the stage's first report

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage.capitalize())

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def seconds_left(self) -> float | None:
        """The stage's remaining time at its rate so far; None before its first step is done."""
        if not self.done or self.seconds <= 0:
            return None
        return max(0.0, self.total - self.done) * self.seconds / self.done


@dataclass
class JobSnapshot:
    """A consistent copy of a job's state for a view to draw."""
    id: int
    kind: str                        # "training", "embedding"
    title: str
    status: str                      # "running", "done", "cancelled" or "failed"
    stages: list[StageProgress]
    result: object                   # a training's run id; None until done
    error: str | None
    seconds: float
    seconds_left: float | None       # None when there is nothing to estimate from yet
    cancelling: bool

    @property
    def run_id(self) -> int | None:
        return self.result if self.kind == "training" else None

    @property
    def running(self) -> bool:
        return self.status == "running"


class Job:
    """Work in a background thread with stage progress and cancellation; subclasses define `title` and `_run`.

    `estimate_s`, when known (e.g. from earlier runs), makes the time left an estimate of the whole job rather
    than of the current stage only.
    """
    kind = "job"
    _ids = itertools.count(1)

    def __init__(self, estimate_s: float | None = None):
        self.id = next(Job._ids)
        self.estimate_s = estimate_s
        self.then: str | None = None     # the page that started it: where its outcome is shown
        self.seen = False                # its outcome has been shown once
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._stages: dict[str, StageProgress] = {}
        self._stage_start: dict[str, float] = {}
        self._status = "running"
        self._result: object = None
        self._error: str | None = None
        self._start = time.perf_counter()
        self._end: float | None = None
        self._thread = threading.Thread(target=self._work, name=f"{self.kind}-{self.id}", daemon=True)

    @property
    def title(self) -> str:
        raise NotImplementedError

    def _run(self, progress) -> object:
        raise NotImplementedError

    def start(self) -> "Job":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        self._thread.join(timeout)
        return self.snapshot()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = time.perf_counter()
            end = self._end if self._end is not None else now
            stages = [StageProgress(s.stage, s.done, s.total, now - self._stage_start[s.stage])
                      for s in self._stages.values()]
            elapsed = end - self._start
            left = None
            if self._status == "running":   # the later of the current stage's end and the estimate's, if not past
                whole = None if self.estimate_s is None or self.estimate_s <= elapsed else self.estimate_s - elapsed
                known = [v for v in (stages[-1].seconds_left if stages else None, whole) if v is not None]
                left = max(known) if known else None
            return JobSnapshot(self.id, self.kind, self.title, self._status, stages, self._result, self._error,
                               elapsed, left, self._cancel.is_set())

    def _progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            if stage not in self._stage_start:
                self._stage_start[stage] = time.perf_counter()
            self._stages.pop(stage, None)              # the latest stage last: its rate is the estimate's
            self._stages[stage] = StageProgress(stage, done, total)
        if self._cancel.is_set():
            raise Cancelled(f"cancelled during {stage}")

    def _work(self) -> None:
        try:
            result, status, error = self._run(self._progress), "done", None
        except Cancelled:
            result, status, error = None, "cancelled", None
        except Exception as exc:  # noqa: BLE001 - shown to the user; the traceback goes to the server log
            traceback.print_exc()
            result, status, error = None, "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._result, self._status, self._error, self._end = result, status, error, time.perf_counter()


class TrainingJob(Job):
    """Train a detector on a registered dataset and register the run, or register a saved model folder."""
    kind = "training"

    def __init__(self, store: RunStore, dataset_id: int, dataset: ImageSet, detector: str | None = None,
                 params: dict | None = None, model_folder: str | Path | None = None, name: str | None = None,
                 audit: str = "off", estimate_s: float | None = None):
        if (detector is None) == (model_folder is None):
            raise ValueError("give either a detector to train or a saved model folder, not both")
        self.store, self.dataset_id, self.dataset = store, dataset_id, dataset
        self.detector, self.params, self.model_folder = detector, dict(params or {}), model_folder
        self.name, self.audit = name, audit
        self.dataset_name = store.get_dataset(dataset_id)["name"]   # as the user named it
        super().__init__(estimate_s)

    @property
    def title(self) -> str:
        what = f"Training {self.detector}" if self.detector else "Registering a saved model"
        return f"{what} on {self.dataset_name}"

    def _run(self, progress) -> int:
        if self.model_folder is not None:
            det = load_detector(self.model_folder)
            return register_fitted(self.store, self.dataset_id, self.dataset, det, progress, self.name)
        return train_run(self.store, self.dataset_id, self.dataset, self.detector, self.params, progress,
                         self.name, audit=self.audit)


class EmbeddingJob(Job):
    """Compute a run's feature maps (UMAP of image and patch embeddings) and save them with its model."""
    kind = "embedding"

    def __init__(self, run: dict, detector, dataset: ImageSet):
        self.run_id, self.model_path = run["id"], run["model_path"]
        self.detector, self.dataset = detector, dataset
        super().__init__()

    @property
    def title(self) -> str:
        return f"Feature maps of run #{self.run_id}"

    def _run(self, progress) -> None:
        save_views(compute_views(self.detector, self.dataset, progress), self.model_path)


class JobBoard:
    """The jobs of one registry in this server process: every page and tab sees the same ones.

    One training at a time (two would share the same cores and both take twice as long); one feature-map
    job per run. Ended jobs stay listed until their outcome has been shown.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: list[Job] = []

    def submit(self, job: Job, then: str | None = None) -> Job:
        """Start a job, or return the running one it would duplicate (a second click, another tab)."""
        with self._lock:
            same = next((j for j in self._jobs if j.snapshot().running and _duplicates(j, job)), None)
            if same is not None:
                return same
            job.then = then
            self._jobs = [j for j in self._jobs if j.snapshot().running or not j.seen] + [job]
            return job.start()

    def jobs(self, kind: str | None = None) -> list[Job]:
        """Newest first."""
        with self._lock:
            return [j for j in reversed(self._jobs) if kind is None or j.kind == kind]

    def running(self, kind: str | None = None) -> list[Job]:
        return [j for j in self.jobs(kind) if j.snapshot().running]

    def latest(self, kind: str, **subject) -> Job | None:
        """The newest job of this kind whose attributes match `subject` (e.g. run_id=3)."""
        return next((j for j in self.jobs(kind) if all(getattr(j, k, None) == v for k, v in subject.items())), None)

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)


def _duplicates(running: Job, new: Job) -> bool:
    if running.kind != new.kind:
        return False
    return new.kind == "training" or getattr(running, "run_id", None) == getattr(new, "run_id", None)


_BOARDS: dict[str, JobBoard] = {}
_BOARDS_LOCK = threading.Lock()


def job_board(registry: str | Path) -> JobBoard:
    """The board of the registry at this path (one per registry, so two workspaces never see each other's)."""
    with _BOARDS_LOCK:
        return _BOARDS.setdefault(str(Path(registry).resolve()), JobBoard())


def estimate_training_seconds(store: RunStore, detector: str, params: dict, n_train: int,
                              n_test: int) -> tuple[float, str] | None:
    """Seconds a training would take, from this registry's earlier runs of the detector (the same settings
    when there are some): their fit time per training image and scoring time per test image, scaled to this
    dataset; with the evidence in words. None without any earlier run of the detector."""
    runs = [r for r in store.list_runs() if r["detector"] == detector and r["timings"].get("fit_seconds")
            and (r["model_card"] or {}).get("n_images")]
    wanted = {k: to_json(v) for k, v in params.items() if k not in ("seed", "device")}
    alike = [r for r in runs if all(to_json(r["params"].get(k)) == v for k, v in wanted.items())]
    basis = alike or runs
    if not basis:
        return None
    fit = sorted(r["timings"]["fit_seconds"] / r["model_card"]["n_images"] for r in basis)[len(basis) // 2]
    score = sorted((r["timings"].get("score_ms_per_image") or 0) / 1000 for r in basis)[len(basis) // 2]
    seconds = fit * n_train + score * n_test
    how = "the same settings" if alike else "other settings"
    return seconds, f"from {len(basis)} earlier {detector} run{'s' if len(basis) != 1 else ''} with {how} here"


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

"""The one path from a dataset to a registered run, shared by the CLI and the dashboard.

dataset -> detector.fit -> scores and maps -> metrics and default threshold -> run registry.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .audit import audit as audit_images
from .audit import check_auditable, fit_tolerant, save_audit_maps
from .data import ImageSet, load_dataset
from .detectors import Detector, create_detector, load_detector
from .detectors.base import Progress, no_progress
from .detectors.calibration import Calibration
from .results import RunResults, load_results, save_results
from .runs import RegistryLockedError, RunStore
from .thresholds import DEFAULT_FALSE_REJECT, MIN_TAIL_IMAGES, normal_threshold
from .workspace import datasets_dir, workspace_dir

# Without ground-truth masks, defect regions start at the map level this share of good pixels reach.
GOOD_PIXEL_SHARE = 0.001


@dataclass
class Evaluation:
    """Scores and maps of a labelled test set, in the detector's input frame, with its metrics."""
    scores: np.ndarray                      # (N,)
    maps: np.ndarray                        # (N, S, S)
    masks: list[np.ndarray | None]          # (S, S) bool per image; None where an anomalous image has no mask
    labels: np.ndarray                      # (N,) 0 normal, 1 anomalous
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def evaluate(detector: Detector, test_set: ImageSet, progress: Progress | None = None) -> Evaluation:
    start = time.perf_counter()
    scores, maps = detector.score_maps(test_set, progress=progress)
    seconds = time.perf_counter() - start
    masks = []
    for i in range(len(test_set)):
        mask = test_set.mask(i)
        masks.append(None if mask is None else detector.preprocess.mask_to_frame(mask))
    labels = test_set.labels
    result = metrics.headline_metrics(labels, scores, masks, maps) if len(set(labels.tolist())) == 2 else {}
    return Evaluation(scores, maps, masks, labels, result, seconds)


def default_thresholds(evaluation: Evaluation | None, calibration: Calibration | None = None,
                       max_pixels: int = 2_000_000) -> dict:
    """F1-max thresholds on the labelled test set: image-level on scores, pixel-level on maps.

    The pixel threshold is F1-max over the pixels of every image with a mask (subsampled evenly to at most
    `max_pixels`). Without labels of both kinds the image threshold comes from the held-out good images
    alone (a 1% false-reject rate, or the lowest rate they can show); without masks the pixel threshold is
    the level one in a thousand of their pixels reach (GOOD_PIXEL_SHARE). Without either, nothing is chosen.
    """
    from_good_pixels = None if calibration is None else calibration.pixel_level(GOOD_PIXEL_SHARE)
    if evaluation is None or "f1_threshold" not in evaluation.metrics:
        image = None
        if calibration is not None:
            n = len(calibration.scores)
            rate = DEFAULT_FALSE_REJECT if n >= MIN_TAIL_IMAGES else max(DEFAULT_FALSE_REJECT, 1 / (n + 1))
            image = normal_threshold(calibration.scores, rate).threshold
        return {"image": image, "pixel": from_good_pixels if image is not None else None,
                "preset": None if image is None else "false_reject_rate"}
    with_mask = [i for i, m in enumerate(evaluation.masks) if m is not None]
    pixel = None
    if with_mask:
        truth = np.stack([evaluation.masks[i] for i in with_mask]).ravel()
        values = evaluation.maps[with_mask].ravel()
        stride = max(1, truth.size // max_pixels)
        if truth[::stride].any() and not truth[::stride].all():
            pixel = metrics.f1_max(truth[::stride].astype(int), values[::stride])[1]
    return {"image": evaluation.metrics["f1_threshold"], "pixel": pixel if pixel is not None else from_good_pixels,
            "preset": "f1_max"}


# Marks a model folder saved but not yet registered; the file holds the training process's id.
UNREGISTERED = ".unregistered-"
# Attempts at registering a finished run while another program holds the registry (each waits its timeout).
REGISTER_ATTEMPTS = 3


def models_dir() -> Path:
    return workspace_dir() / "models"


def dataset_kind(dataset: ImageSet) -> str:
    """The registry's kind of a loaded set: "mvtec" when it has a test split, "folder" for normal images only.
    (Sets the app assembles itself are "upload", and "zip" when extracted from an archive on the command line.)"""
    return "mvtec" if any(s.split == "test" for s in dataset.samples) else "folder"


def register_dataset(store: RunStore, dataset: ImageSet, kind: str | None = None, name: str | None = None) -> int:
    """The registry id of a dataset, adding it on first use (datasets are keyed by name); the kind is
    :func:`dataset_kind`'s unless the caller made the set itself ("zip", "upload")."""
    name = name or dataset.name
    found = store.find_dataset(name)
    if found is not None:
        return found["id"]
    return store.add_dataset(name=name, source=str(dataset.report.source), kind=kind or dataset_kind(dataset),
                             summary=dataset.summary(), report=report_dict(dataset))


def open_dataset(record: dict) -> ImageSet:
    """Load a registered dataset (a registry row) from where it lives, as the user corrected it from the heatmaps
    (:func:`corrections`): the one way the CLI, the dashboard and re-evaluation reopen a dataset."""
    source = Path(record["source"])
    if source.is_file() and zipfile.is_zipfile(source):
        # Registered from a zip by an older CLI, which recorded the archive: use its extracted copy.
        copies = sorted(datasets_dir().glob(f"{source.stem}-*"))
        source = copies[0] if copies else source
    if not source.is_dir():
        raise FileNotFoundError(f"dataset {record['name']!r}: its files are gone from {record['source']}")
    return load_dataset(source).corrected(corrections(record))


def corrections(record: dict) -> dict[str, str]:
    """What the user said the images of a registered dataset are, path -> "good" or "defective"
    (:meth:`RunStore.set_feedback`): good ones are trained on from the next fit, defective ones never."""
    return {f["path"]: f["verdict"] for f in record["feedback"]}


def report_dict(dataset: ImageSet) -> dict:
    return {"skipped": [list(x) for x in dataset.report.skipped],
            "warnings": [list(x) for x in dataset.report.warnings], "summary": dataset.report.summary()}


# What train_run does about dirty training sets: nothing, list the suspicious images, or also leave them out.
AUDIT_MODES = ("off", "flag", "drop")


def training_images(store: RunStore, dataset_id: int, dataset: ImageSet) -> ImageSet:
    """The dataset's good training images, less those the user left out (:meth:`RunStore.set_excluded`)."""
    train = dataset.subset(split="train", label=0)
    excluded = set(store.get_dataset(dataset_id)["excluded"])
    return train[[i for i, s in enumerate(train.samples) if str(s.path) not in excluded]] if excluded else train


def train_run(store: RunStore, dataset_id: int, dataset: ImageSet, detector: str, params: dict | None = None,
              progress: Progress | None = None, name: str | None = None, audit: str = "off") -> int:
    """Fit on the dataset's good training images (less those the user left out, with those they marked good),
    then evaluate on its test images (less those), save and register (see register_fitted).

    `audit` "flag" audits the training images after the fit (core.audit): every image's out-of-fold score is
    registered (split "audit"; defect "suspicious" beyond the outlier fence) and the maps of the highest are
    saved with the model, for the Datasets page to show. "drop" also leaves the suspicious ones out of the
    final fit (core.audit.fit_tolerant; defect "dropped").
    """
    if audit not in AUDIT_MODES:
        raise ValueError(f"audit must be one of {AUDIT_MODES}, got {audit!r}")
    progress = progress or no_progress
    det = create_detector(detector, **(params or {}))
    marked = corrections(store.get_dataset(dataset_id))
    dataset = dataset.corrected(marked)   # as open_dataset reads it, also for a set the caller loaded itself (CLI)
    train = training_images(store, dataset_id, dataset)
    if not len(train):
        raise ValueError("every training image of this dataset was left out: restore some on the Datasets page")
    if audit != "off":
        check_auditable(det, len(train))   # before the fit, not after it
    left_out = len(dataset.subset(split="train", label=0)) - len(train)
    extra, maps = [], {}
    if audit == "off":
        det.fit(train, progress)
    else:
        if audit == "drop":
            det, found = fit_tolerant(det, train, progress)
        else:
            found = audit_images(det.fit(train, progress), train, progress)
            det.fit_info_["audit"] = {**found.summary(), "dropped": []}
        flagged = set(found.suspicious.tolist())
        dropped = flagged if audit == "drop" else set()
        det.fit_info_["audit"]["dropped_files"] = [train.samples[i].path.name for i in sorted(dropped)]
        extra = [{"path": str(s.path), "split": "audit", "score": float(found.scores[i]),
                  "defect": "dropped" if i in dropped else "suspicious" if i in flagged else None}
                 for i, s in enumerate(train.samples)]
        maps = {str(train.samples[i].path): m for i, m in found.maps.items()}
        train = train[[i for i in range(len(train)) if i not in dropped]]
    if left_out:
        det.fit_info_["left_out_by_user"] = left_out
    marked_good = sum(marked.get(str(s.path)) == "good" for s in train.samples)
    if marked_good:
        det.fit_info_["marked_good_by_user"] = marked_good
    return register_fitted(store, dataset_id, dataset, det, progress, name, fitted_on=train, extra_scores=extra,
                           audit_maps=maps)


def register_fitted(store: RunStore, dataset_id: int, dataset: ImageSet, det: Detector,
                    progress: Progress | None = None, name: str | None = None,
                    fitted_on: ImageSet | None = None, extra_scores: list[dict] | None = None,
                    audit_maps: dict[str, np.ndarray] | None = None) -> int:
    """Evaluate a fitted detector on the dataset's test split, save it and register the run; `fitted_on`,
    the images it was just fitted on, names the calibration images in the registry's scores; `audit_maps`
    (training image path -> out-of-fold map) are saved with the model.

    The model folder (with the test results: maps and masks, for views) is written first and the run row
    with all its scores in one transaction after it, so an interrupted run leaves nothing registered (and
    its model folder is removed).
    """
    progress = progress or no_progress
    test = dataset.subset(split="test")
    evaluation = evaluate(det, test, progress) if len(test) else None
    model_path = models_dir() / f"{det.name}-{uuid.uuid4().hex[:12]}"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Until the run row is committed the folder is claimed by this process: a kill -9 in between leaves a
    # claim whose process is gone, and the next start removes the folder (sweep_unregistered_models).
    claim = model_path.parent / f"{UNREGISTERED}{model_path.name}"
    claim.write_text(str(os.getpid()))
    try:
        det.save(model_path)
        if evaluation is not None:
            save_results(model_path, test.samples, evaluation, det.preprocess)
        if audit_maps:
            save_audit_maps(model_path, audit_maps)
        scores = [] if evaluation is None else [
            {"path": str(s.path), "split": s.split, "label": s.label, "defect": s.defect, "score": float(v)}
            for s, v in zip(test.samples, evaluation.scores)]
        scores += [] if fitted_on is None else calibration_rows(det, fitted_on)
        scores += extra_scores or []
        timings = {"fit_seconds": det.fit_info_["fit_seconds"],
                   "score_ms_per_image": None if evaluation is None else 1000 * evaluation.seconds / len(test),
                   "memory_mb": model_memory_mb(det, model_path)}
        run = dict(dataset_id=dataset_id, detector=det.name, params=det.get_params(), model_path=str(model_path),
                   metrics={} if evaluation is None else evaluation.metrics, timings=timings,
                   model_card=det.model_card(), scores=scores,
                   thresholds=default_thresholds(evaluation, getattr(det, "calibration_", None)), name=name)
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                run_id = store.add_run(**run)
                break
            except RegistryLockedError as exc:
                if attempt + 1 < REGISTER_ATTEMPTS:
                    progress("registry locked: waiting", attempt + 1, REGISTER_ATTEMPTS)
                    continue
                claim.unlink(missing_ok=True)   # the fit is kept for the user, not swept
                raise RegistryLockedError(f"{exc}. The fitted model is kept in {model_path}: register it when the "
                                          "registry is free (Train page, 'Load a saved model')") from None
    except RegistryLockedError:
        raise
    except BaseException:
        shutil.rmtree(model_path, ignore_errors=True)
        claim.unlink(missing_ok=True)
        raise
    claim.unlink(missing_ok=True)
    return run_id


def model_memory_mb(detector: Detector, model_path: str | Path) -> float:
    """Memory the saved model needs to run: its fitted tensors plus the frozen backbone's weights."""
    fitted = (Path(model_path) / "fitted.safetensors").stat().st_size
    extractor = detector.feature_extractor()
    backbone = 0 if extractor is None else sum(
        t.numel() * t.element_size() for t in [*extractor.parameters(), *extractor.buffers()])
    return (fitted + backbone) / 2**20


def calibration_rows(det: Detector, train: ImageSet) -> list[dict]:
    """Registry rows of the calibration: each held-out (or cross-fitted) good training image's score, split
    "calibration", and its synthetic defect's, split "synthetic" (label 1, the generator as the defect)."""
    cal = getattr(det, "calibration_", None)
    if cal is None:
        return []
    rows = []
    for i, score, synthetic, kind in zip(cal.index, cal.scores, cal.synthetic_scores, cal.synthetic_kinds):
        path = str(train.samples[i].path)
        rows.append({"path": path, "split": "calibration", "label": 0, "defect": "good", "score": float(score)})
        rows.append({"path": path, "split": "synthetic", "label": 1, "defect": kind, "score": float(synthetic)})
    return rows


def sweep_unregistered_models() -> list[Path]:
    """Remove model folders whose training was killed between saving and registering (their claim names a
    process that is gone), and the temporary folders such saves left; returns what was removed."""
    folder = models_dir()
    removed = []
    for claim in sorted(folder.glob(f"{UNREGISTERED}*")) if folder.is_dir() else []:
        try:
            pid = int(claim.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            continue
        name = claim.name[len(UNREGISTERED):]
        for leftover in [folder / name, *folder.glob(f".{name}.*")]:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
        claim.unlink(missing_ok=True)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def run_results(store: RunStore, run_id: int, progress: Progress | None = None) -> RunResults | None:
    """The run's saved test results; runs saved without them are evaluated once more and get them.

    None when the run's dataset has no test images.
    """
    run = store.get_run(run_id)
    found = load_results(run["model_path"])
    if found is not None:
        return found
    test = open_dataset(store.get_dataset(run["dataset_id"])).subset(split="test")
    if not len(test):
        return None
    det = load_detector(run["model_path"])
    save_results(run["model_path"], test.samples, evaluate(det, test, progress), det.preprocess)
    return load_results(run["model_path"])


"""Dirty training sets: every good training image scored by a model fitted without it, so that a defective
part filed as good stands out instead of teaching the model that its defect is normal.

An audit is a five-fold cross-fit with a fitted detector's settings
(:func:`core.detectors.calibration.fold_models`): each image's out-of-fold score is how anomalous it looks to
a model that never saw it. The images are ranked by that score for a person to review from the top, and
those beyond Tukey's outlier fence (Q3 + 1.5 IQR of the out-of-fold scores: it needs no defect images, and
a few outliers do not widen it) are flagged as suspicious. A tolerant fit drops the flagged images and fits
again: dropping a good image costs the model little, keeping a defect teaches it that the defect is normal,
so the fence is the ordinary one rather than the far-out one (3 IQR).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .detectors import Detector, create_detector
from .detectors.base import Progress, no_progress
from .detectors.calibration import FOLDS, MIN_IMAGES, fold_models, take
from .files import save_arrays

FENCE_IQR = 1.5
SHOWN = 15      # the audit keeps the anomaly maps of this many top-ranked images, for people to look at
MAPS_FILE = "audit_maps.npz"


@dataclass
class Audit:
    scores: np.ndarray                    # (n,) out-of-fold score of each training image, in their order
    fence: float                          # scores above it are suspicious
    maps: dict[int, np.ndarray] = field(default_factory=dict)   # position -> map (model frame), top-ranked

    @property
    def ranking(self) -> np.ndarray:
        """Positions of the training images, most suspicious first."""
        return np.argsort(-self.scores, kind="stable")

    @property
    def suspicious(self) -> np.ndarray:
        """Positions beyond the fence, most suspicious first."""
        return np.array([i for i in self.ranking if self.scores[i] > self.fence], dtype=int)

    def summary(self) -> dict:
        return {"n_images": int(len(self.scores)), "folds": FOLDS, "fence": float(self.fence),
                "suspicious": self.suspicious.tolist()}


def outlier_fence(scores: np.ndarray) -> float:
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    return float(q3 + FENCE_IQR * (q3 - q1))


def audit(detector: Detector, images: Sequence[np.ndarray], progress: Progress = no_progress, seed: int = 0,
          shown: int = SHOWN) -> Audit:
    """Out-of-fold scores of the images a fitted `detector` was (or would be) trained on, with its settings."""
    check_auditable(detector, len(images))
    scores = np.full(len(images), np.nan, dtype=np.float64)
    maps: dict[int, np.ndarray] = {}
    for k, (fold, model) in enumerate(fold_models(detector, images, seed)):
        fold_scores, fold_maps = model.score_maps(take(images, fold))
        scores[fold] = fold_scores
        # Keep the maps of the highest scores seen so far only: memory stays bounded on large sets.
        maps.update({int(i): m for i, m in zip(fold, fold_maps)})
        top = set(np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:shown].tolist())
        maps = {i: m for i, m in maps.items() if i in top}
        progress("audit", k + 1, FOLDS)
    if not np.isfinite(scores).all():
        raise ValueError("some training images scored NaN or infinite in the audit: the model is broken")
    return Audit(scores, outlier_fence(scores), maps)


def check_auditable(detector: Detector, n: int) -> None:
    if n < MIN_IMAGES:
        raise ValueError(f"an audit needs at least {MIN_IMAGES} training images, got {n}")
    if not detector.cross_fit:
        raise ValueError(f"{detector.name} trains a network: an audit would train it {FOLDS} more times. Audit "
                         "with patchcore or padim; the images they flag are suspicious for any detector")


def fit_tolerant(detector: Detector, images: Sequence[np.ndarray], progress: Progress = no_progress,
                 seed: int = 0) -> tuple[Detector, Audit]:
    """Fit, audit the images, drop the suspicious ones and fit again with the settings chosen the first time
    (so the refit does not choose them again on a cleaner set). Returns the final model and the audit; the
    model's `fit_info_["audit"]` records what was dropped."""
    check_auditable(detector, len(images))   # before the first fit, not after it
    detector.fit(images, progress)
    found = audit(detector, images, progress, seed)
    dropped = found.suspicious
    if len(dropped):
        keep = np.setdiff1d(np.arange(len(images)), dropped)
        params = {**detector.fold_params(), "calibration_fraction": detector.calibration_fraction}
        auto = detector.fit_info_.get("auto_settings")
        detector = create_detector(detector.name, **params).fit(take(images, keep), progress)
        if auto:
            detector.fit_info_["auto_settings"] = auto
    detector.fit_info_["audit"] = {**found.summary(), "dropped": dropped.tolist()}
    return detector, found


def save_audit_maps(folder: str | Path, maps: dict[str, np.ndarray]) -> Path:
    """Write the audit's maps (training image path -> map in the model frame, float16) into a model folder."""
    return save_arrays(Path(folder) / MAPS_FILE, maps=np.stack(list(maps.values())).astype(np.float16),
                       paths=np.array(json.dumps(list(maps))))


def load_audit_maps(folder: str | Path) -> dict[str, np.ndarray]:
    """The audit maps saved with a model ({} when it was trained without an audit)."""
    path = Path(folder) / MAPS_FILE
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return dict(zip(json.loads(str(data["paths"])), data["maps"].astype(np.float32)))


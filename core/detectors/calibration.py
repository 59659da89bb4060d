"""The calibration split: good training images the model is not fitted on, scored after the fit, so that a
threshold can be set from good images alone (:func:`core.thresholds.normal_threshold`) and what it would
miss estimated on synthetic defects pasted into the same images.

Sets of about 100 images and more hold out a share (`calibration_fraction`). Smaller sets cannot spare
images, so they are cross-fitted: every image is scored by a model fitted on the other folds with the final
model's settings, and the final model is fitted on every image. Fold models see fewer images than the final
one, so they score good images a little higher: a threshold set on their scores rejects slightly fewer good
parts than it states, never more. Detectors that train a network for minutes (`cross_fit = False`) are not
refitted: on a small set they calibrate only if told to hold out ten images. Few-shot detectors
(`few_shot = True`) fit from a single image, so 2 to 9 images are still cross-fitted, leaving one out each time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from safetensors import safe_open

from ..data import image_batches
from ..synthetic import synthetic_defect

if TYPE_CHECKING:
    from .base import Detector, Progress

MIN_HELD_OUT = 10    # fewest held-out images a split is worth; a set that would hold out fewer is cross-fitted
MAX_HELD_OUT = 500   # enough for a 0.2% false-reject rate; more would only take images from the model
FOLDS = 5
MIN_IMAGES = 10      # below this every image is needed for the model and nothing is calibrated
BATCH = 16
# Keys of the calibration scores in a model's fitted.safetensors (beside the detector's own tensors).
CALIBRATION_SCORES = "calibration.scores"
SYNTHETIC_SCORES = "calibration.synthetic_scores"
CALIBRATION_MAPS = "calibration.maps"
# The calibration maps are kept as every k-th pixel, k chosen so the long side is at most this: an unbiased
# sample of the good pixels' values (4,096 per image, 4 MB for 500 images in float16), not a picture.
MAP_SAMPLE_SIDE = 64


@dataclass
class Calibration:
    """Scores of good images the scoring model never saw, and of one synthetic defect pasted into each."""
    method: str                   # "held_out" or "cross_fit"
    index: list[int]              # positions in the training images, in the order of the scores
    scores: np.ndarray            # (n,) float32
    synthetic_scores: np.ndarray  # (n,) float32
    synthetic_kinds: list[str] = field(default_factory=list)
    maps: np.ndarray | None = None   # (n, h, w) float16: each good image's map, every k-th pixel (MAP_SAMPLE_SIDE)

    def pixel_level(self, share: float) -> float | None:
        """The map value that this share of the good images' pixels reach (None without maps)."""
        if self.maps is None:
            return None
        return float(np.quantile(self.maps.astype(np.float32), 1 - share))

    def summary(self) -> dict:
        return {"method": self.method, "n_images": len(self.index),
                **({"folds": FOLDS} if self.method == "cross_fit" else {})}

    def to_json(self) -> dict:
        return {"method": self.method, "index": self.index, "synthetic_kinds": self.synthetic_kinds}

    @classmethod
    def from_saved(cls, saved: dict, scores, synthetic_scores, maps=None) -> "Calibration":
        index = [int(i) for i in saved["index"]]
        scores = np.asarray(scores, dtype=np.float32)
        synthetic = np.asarray(synthetic_scores, dtype=np.float32)
        if saved["method"] not in ("held_out", "cross_fit") or not (len(index) == len(scores) == len(synthetic)):
            raise ValueError("the calibration record does not match its scores")
        if maps is not None and len(maps) != len(scores):
            raise ValueError("the calibration maps do not match its scores")
        return cls(saved["method"], index, scores, synthetic, [str(k) for k in saved.get("synthetic_kinds", [])],
                   None if maps is None else np.asarray(maps, dtype=np.float16))


def load_calibration(folder) -> Calibration | None:
    """A saved model's calibration without loading the model (None for models saved before calibration)."""
    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text()).get("calibration")
    if saved is None:
        return None
    with safe_open(folder / "fitted.safetensors", framework="pt") as f:
        maps = f.get_tensor(CALIBRATION_MAPS).numpy() if CALIBRATION_MAPS in f.keys() else None
        return Calibration.from_saved(saved, f.get_tensor(CALIBRATION_SCORES).numpy(),
                                      f.get_tensor(SYNTHETIC_SCORES).numpy(), maps)


def held_out_index(n: int, fraction: float, seed: int) -> np.ndarray:
    """Positions of the images held out of the fit: empty where the set is cross-fitted or too small."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 0.5:
        raise ValueError(f"calibration_fraction must be a number in [0, 0.5), got {fraction!r}")
    n_held = min(int(round(fraction * n)), MAX_HELD_OUT)
    if fraction == 0 or n_held < MIN_HELD_OUT:
        return np.zeros(0, dtype=int)
    return np.sort(np.random.default_rng(seed).choice(n, n_held, replace=False))


def take(images: Sequence[np.ndarray], index) -> Sequence[np.ndarray]:
    """The images at these positions: a lazy subset of an ImageSet, a list otherwise."""
    if hasattr(images, "samples"):
        return images[np.asarray(index, dtype=int)]
    return [images[int(i)] for i in index]


def calibrate(detector: "Detector", images: Sequence[np.ndarray], held: np.ndarray, progress: "Progress",
              seed: int) -> Calibration | None:
    """Score the calibration images of a just-fitted detector (see the module docstring)."""
    n = len(images)
    rng = np.random.default_rng(seed + 1)
    if len(held):
        scores, synthetic, kinds, maps = _score(detector, take(images, held), rng)
        progress("calibration", 1, 1)
        return Calibration("held_out", held.tolist(), scores, synthetic, kinds, maps)
    if detector.calibration_fraction == 0 or n < (2 if detector.few_shot else MIN_IMAGES) or not detector.cross_fit:
        return None
    parts = []
    folds = min(FOLDS, n)      # a few-shot set of fewer images is cross-fitted leaving one out
    for k, (fold, model) in enumerate(fold_models(detector, images, seed, folds)):
        parts.append((fold, *_score(model, take(images, fold), rng)))
        progress("calibration", k + 1, folds)
    return Calibration("cross_fit", [int(i) for p in parts for i in p[0]],
                       np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                       [kind for p in parts for kind in p[3]], np.concatenate([p[4] for p in parts]))


def fold_models(detector: "Detector", images: Sequence[np.ndarray], seed: int, folds: int = FOLDS):
    """(positions, model) per fold: a model with the fitted `detector`'s settings, fitted on every image but
    those at the positions, made one at a time."""
    from .base import create_detector
    order = np.random.default_rng(seed).permutation(len(images))
    for fold in np.array_split(order, folds):
        model = create_detector(detector.name, **detector.fold_params())
        yield fold, model.fit(take(images, np.setdiff1d(order, fold)))


def _score(detector: "Detector", images: Sequence[np.ndarray], rng: np.random.Generator):
    """Image scores and sampled maps of these good images, and the score of one synthetic defect in each (made
    a batch at a time)."""
    scores, synthetic, kinds, maps = [], [], [], []
    for _, batch in image_batches(images, BATCH):
        defects = [synthetic_defect(image, rng) for image in batch]
        batch_scores, batch_maps = detector.score_maps(batch)
        step = max(1, -(-max(batch_maps.shape[1:]) // MAP_SAMPLE_SIDE))
        scores.append(batch_scores)
        maps.append(batch_maps[:, ::step, ::step].astype(np.float16))
        synthetic.append(detector.score_maps([d[0] for d in defects])[0])
        kinds += [d[2] for d in defects]
    return (np.concatenate(scores).astype(np.float32), np.concatenate(synthetic).astype(np.float32), kinds,
            np.concatenate(maps))

"""The live demo's one call: an image in, OK, review or NG with its score, map and timing out."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .detectors import Detector
from .thresholds import verdict


@dataclass(frozen=True)
class Verdict:
    score: float
    threshold: float
    map: np.ndarray          # HxW at the image's own resolution, on the run's scale
    seconds: float           # detector time for this image
    review: float | None = None   # lower end of the review band, if the run has one

    @property
    def label(self) -> str:
        """"OK", "review" or "NG" (see core.thresholds.verdict)."""
        return verdict(self.score, self.threshold, self.review)


def inspect_image(detector: Detector, image: np.ndarray, threshold: float, review: float | None = None) -> Verdict:
    start = time.perf_counter()
    prediction = detector.predict([image])
    return Verdict(float(prediction.scores[0]), float(threshold), prediction.maps[0], time.perf_counter() - start,
                   review)


def warm_up(detector: Detector, size: int = 256) -> None:
    """Score one blank image so lazy initialisation is not paid by the first real one."""
    detector.predict([np.full((size, size, 3), 128, dtype=np.uint8)])

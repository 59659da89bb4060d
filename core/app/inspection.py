"""The live demo's one call: an image in, OK, review or NG with its score, map, reason and timing out."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..detectors import Detector
from ..rules import Decision, DefectRules, decide


@dataclass(frozen=True)
class Verdict:
    score: float
    threshold: float
    map: np.ndarray          # HxW at the image's own resolution, on the run's scale
    seconds: float           # detector time for this image
    review: float | None = None   # lower end of the review band, if the run has one
    pixel_threshold: float | None = None
    rules: DefectRules | None = None

    @property
    def decision(self) -> Decision:
        """The verdict with the rule that decided it (see core.rules.decide)."""
        return decide(self.score, self.map, self.threshold, self.review, self.pixel_threshold, self.rules)

    @property
    def label(self) -> str:
        """"OK", "review" or "NG"."""
        return self.decision.label


def inspect_image(detector: Detector, image: np.ndarray, threshold: float, review: float | None = None,
                  pixel_threshold: float | None = None, rules: DefectRules | None = None) -> Verdict:
    start = time.perf_counter()
    prediction = detector.predict([image])
    return Verdict(float(prediction.scores[0]), float(threshold), prediction.maps[0], time.perf_counter() - start,
                   review, pixel_threshold, rules)


def warm_up(detector: Detector, size: int = 256) -> None:
    """Score one blank image so lazy initialisation is not paid by the first real one."""
    detector.predict([np.full((size, size, 3), 128, dtype=np.uint8)])

"""A run's model with its saved thresholds and defect rules: an image in, a verdict out.

The CLI's `predict`, the inspection service and Ray scoring all decide through :class:`Inspector`, so one
image gets the same score, verdict and reason whichever way it is scored.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..detectors import Detector
from ..rules import DefectRules, decide
from ..thresholds import check_threshold, normal_threshold


@dataclass(frozen=True)
class Inspection:
    score: float
    label: str               # "OK", "review" or "NG"; "" when the run has no threshold
    reason: str              # the rule that decided it
    map: np.ndarray          # HxW at the image's own resolution, on the run's scale
    seconds: float           # detector time for this image


@dataclass(frozen=True)
class Inspector:
    detector: Detector
    threshold: float | None = None
    review: float | None = None
    pixel_threshold: float | None = None
    rules: DefectRules = field(default_factory=DefectRules)

    def __post_init__(self):
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_threshold(self.threshold, "image threshold"))
        if self.review is not None:
            review = check_threshold(self.review, "review threshold")
            if self.threshold is None or review >= self.threshold:
                raise ValueError(f"the review threshold {review:.6g} must be below the image threshold "
                                 f"({'none' if self.threshold is None else format(self.threshold, '.6g')})")
        if not self.rules.empty:
            if self.threshold is None:
                raise ValueError("defect rules (a region of interest, a minimum area) need an image threshold")
            # Regions are found at the pixel threshold; a run without one uses the image threshold (as the dashboard).
            pixel = self.pixel_threshold if self.pixel_threshold is not None else self.threshold
            object.__setattr__(self, "pixel_threshold", check_threshold(pixel, "pixel threshold"))

    @classmethod
    def from_run(cls, detector: Detector, run: dict, threshold: float | None = None, review: float | None = None,
                 pixel_threshold: float | None = None, rules: DefectRules | None = None,
                 false_reject_rate: float | None = None, log=lambda message: print(message, file=sys.stderr)
                 ) -> "Inspector":
        """The run's saved thresholds and rules, each replaced by the one given; `false_reject_rate` sets the
        image threshold from the model's held-out good images."""
        saved = run["thresholds"]
        if false_reject_rate is not None:
            if detector.calibration_ is None:
                raise ValueError("a false-reject rate needs a model saved with held-out good images; this one was "
                                 "saved before calibration existed or fitted on too few images: give a threshold")
            chosen = normal_threshold(detector.calibration_.scores, false_reject_rate)
            log(f"threshold {chosen.threshold:.6g}: {chosen.describe()}")
            threshold = chosen.threshold
        return cls(detector,
                   threshold if threshold is not None else saved["image"],
                   review if review is not None else saved["review"],
                   pixel_threshold if pixel_threshold is not None else saved["pixel"],
                   rules if rules is not None else DefectRules.of_run(run))

    def inspect(self, image: np.ndarray) -> Inspection:
        start = time.perf_counter()
        prediction = self.detector.predict([image])
        seconds = time.perf_counter() - start
        score, amap = float(prediction.scores[0]), prediction.maps[0]
        if self.threshold is None:
            return Inspection(score, "", "", amap, seconds)
        decision = decide(score, amap, self.threshold, self.review, self.pixel_threshold, self.rules)
        return Inspection(score, decision.label, decision.rule, amap, seconds)

    def warm_up(self) -> None:
        """Score one blank image at the model's frame, so that lazy initialisation is not paid by the first part."""
        h, w = getattr(self.detector, "input_frame_", None) or (256, 256)
        self.detector.predict([np.full((int(h), int(w), 3), 128, dtype=np.uint8)])

    def heatmap_scale(self, amap: np.ndarray, vmax: float | None = None) -> float:
        """Top of a heatmap's colour scale: `vmax`, else twice the threshold, else the map's own maximum."""
        return vmax if vmax is not None else (2 * self.threshold if self.threshold else float(amap.max()))

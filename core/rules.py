"""Defect rules: what counts as a defect on top of the anomaly score, and which rule decided a verdict.

A score says how unusual a part looks; a line also needs to say where unusual matters and how big it must
be. Two rules, saved with the run's thresholds:

- a region of interest (a mask, drawn or uploaded, in the image's own geometry): outside it nothing counts,
  so a label, a fixture or the conveyor in view cannot send a part to NG;
- a minimum defect area, in image pixels (or mm^2 given a scale): a connected region of the pixel map at
  or above the pixel threshold must be at least this big to count.

Rules can only clear a verdict, never raise one: a part whose score is below the thresholds is OK whatever
the map shows. A part the score sends to review or NG keeps that verdict when a region inside the ROI and
large enough explains it, and is OK when every such region lies outside the ROI or is too small. A score
or map value that is not a finite number counts as above every threshold, so a broken computation is NG.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .data import png_bytes, read_mask
from .thresholds import is_anomalous, verdict

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
OUTSIDE_ROI = "outside the region of interest"
TOO_SMALL = "smaller than the minimum area"


@dataclass(frozen=True)
class DefectRules:
    """``roi``: HxW bool, True where defects count, at any resolution (resized to each map; None: the whole
    image). ``min_area``: the smallest region that counts, in pixels of the image's own frame.
    ``mm_per_px``: the scale, only to show areas in mm^2."""
    roi: np.ndarray | None = None
    min_area: float = 0.0
    mm_per_px: float | None = None

    def __post_init__(self):
        if self.roi is not None:
            roi = np.asarray(self.roi, dtype=bool)
            if roi.ndim != 2 or roi.shape[0] < 2 or roi.shape[1] < 2:
                raise ValueError(f"a region of interest is an HxW mask, got shape {roi.shape}")
            if not roi.any():
                raise ValueError("the region of interest is empty: every defect would be ignored")
            object.__setattr__(self, "roi", roi)
        area = float(self.min_area)
        if not np.isfinite(area) or area < 0:
            raise ValueError(f"the minimum defect area must be a number >= 0, got {self.min_area!r}")
        object.__setattr__(self, "min_area", area)
        if self.mm_per_px is not None and not (np.isfinite(self.mm_per_px) and self.mm_per_px > 0):
            raise ValueError(f"the scale must be a positive number of mm per pixel, got {self.mm_per_px!r}")

    @property
    def empty(self) -> bool:
        return self.roi is None and self.min_area == 0

    def roi_at(self, shape: tuple[int, int], preprocess=None) -> np.ndarray | None:
        """The ROI in a map's frame: the image's own frame resized to `shape`, or with `preprocess` the model's
        input frame (resized and cropped like the image)."""
        if self.roi is None:
            return None
        if preprocess is not None:
            return preprocess.mask_to_frame(self.roi)
        if self.roi.shape == tuple(shape):
            return self.roi
        pil = Image.fromarray(self.roi.astype(np.uint8) * 255)
        return np.asarray(pil.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 0

    def area_text(self, pixels: float) -> str:
        text = f"{pixels:.4g} px"
        return text if self.mm_per_px is None else f"{text} ({pixels * self.mm_per_px ** 2:.3g} mm²)"

    def describe(self) -> str:
        parts = []
        if self.roi is not None:
            parts.append(f"region of interest ({100 * self.roi.mean():.0f}% of the image)")
        if self.min_area > 0:
            parts.append(f"minimum defect area {self.area_text(self.min_area)}")
        return ", ".join(parts) or "no defect rules"

    # -- persistence: JSON settings and the ROI as a PNG (no pickles) ----------------------------------
    def settings(self) -> dict:
        return {"min_area": self.min_area, "mm_per_px": self.mm_per_px}

    def roi_png(self) -> bytes | None:
        return None if self.roi is None else png_bytes(self.roi.astype(np.uint8) * 255)

    @classmethod
    def from_saved(cls, settings: dict | None, roi_png: bytes | None) -> "DefectRules":
        settings = settings or {}
        roi = None if roi_png is None else read_mask(roi_png)
        return cls(roi, settings.get("min_area", 0.0), settings.get("mm_per_px"))

    @classmethod
    def of_run(cls, run: dict) -> "DefectRules":
        """The rules saved with a run of the registry (:meth:`core.runs.RunStore.set_rules`)."""
        return cls.from_saved(run.get("rules"), run.get("roi"))


def roi_from_shapes(boxes: list[dict], lassos: list[dict], hw: tuple[int, int]) -> np.ndarray | None:
    """An HxW ROI: the union of rectangles ``{"x": [x0, x1], "y": [y0, y1]}`` and polygons ``{"x": [...], "y":
    [...]}`` in image pixels (what a box or lasso selection on a plot of the image gives); None if none."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        (x0, x1), (y0, y1) = sorted(box["x"]), sorted(box["y"])
        draw.rectangle([x0, y0, x1, y1], fill=255)
    for lasso in lassos:
        if len(lasso["x"]) >= 3:
            draw.polygon(list(zip(lasso["x"], lasso["y"])), fill=255)
    roi = np.asarray(canvas) > 0
    return roi if roi.any() else None


@dataclass(frozen=True)
class Region:
    """A connected region of the map at or above the pixel threshold (the part inside the ROI, if any)."""
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 in the image's own pixels (x1, y1 exclusive)
    area: float                      # image pixels
    peak: float                      # highest map value in it
    ignored: str | None = None       # why it does not count (OUTSIDE_ROI, TOO_SMALL), None if it does

    @property
    def centre(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


@dataclass(frozen=True)
class Decision:
    """A verdict with the reason: ``rule`` names what decided it, ``regions`` what the rules looked at."""
    label: str                       # "OK", "review" or "NG"
    rule: str
    regions: list[Region] = field(default_factory=list)

    @property
    def counted(self) -> list[Region]:
        return [r for r in self.regions if r.ignored is None]


def find_regions(amap: np.ndarray, pixel_threshold: float, rules: DefectRules, preprocess=None,
                 image_hw: tuple[int, int] | None = None) -> list[Region]:
    """Regions of `amap` at or above `pixel_threshold` (non-finite values included), largest first.

    `amap` is in the image's own frame, or with `preprocess` in the model's input frame of an image of size
    `image_hw`; boxes and areas are given in the image's own pixels either way.
    """
    amap = np.asarray(amap, dtype=np.float32)
    hot = is_anomalous(amap, pixel_threshold)
    if not hot.any():
        return []
    # One map pixel covers this many image pixels (the model frame is the image resized, before any crop).
    sy = sx = 1.0
    if image_hw is not None:
        frame = preprocess.frame if preprocess is not None else amap.shape
        sy, sx = image_hw[0] / frame[0], image_hw[1] / frame[1]
    oy, ox = (0, 0) if preprocess is None else _crop_offset(preprocess)
    roi = rules.roi_at(amap.shape, preprocess)
    labels, n = ndimage.label(hot, structure=EIGHT_CONNECTED)
    peaks = np.nan_to_num(amap, nan=np.inf, posinf=np.inf)
    regions = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[where] == k
        if roi is not None:
            counted_part = inside & roi[where]
            ignored = OUTSIDE_ROI if not counted_part.any() else None
            inside = counted_part if counted_part.any() else inside
        else:
            ignored = None
        rows, cols = np.nonzero(inside)
        y0, x0 = where[0].start + rows.min(), where[1].start + cols.min()
        y1, x1 = where[0].start + rows.max() + 1, where[1].start + cols.max() + 1
        area = float(inside.sum()) * sy * sx
        if ignored is None and area < rules.min_area:
            ignored = TOO_SMALL
        box = (int((x0 + ox) * sx), int((y0 + oy) * sy), int(round((x1 + ox) * sx)), int(round((y1 + oy) * sy)))
        regions.append(Region(box, area, float(peaks[where][inside].max()), ignored))
    return sorted(regions, key=lambda r: -r.area)


def _crop_offset(preprocess) -> tuple[int, int]:
    (fh, fw), (ih, iw) = preprocess.frame, preprocess.input_hw
    return (fh - ih) // 2, (fw - iw) // 2


def decide(score: float, amap: np.ndarray, threshold: float, review: float | None = None,
           pixel_threshold: float | None = None, rules: DefectRules | None = None, preprocess=None,
           image_hw: tuple[int, int] | None = None) -> Decision:
    """The verdict of one image from its score and map, with the rule that decided it.

    Without rules (or a pixel threshold to find regions with) this is :func:`core.thresholds.verdict`. With
    them a review or NG score stands only if a region inside the ROI and at least the minimum area explains
    it. The map's frame is given as in :func:`find_regions`.
    """
    label = verdict(score, threshold, review)
    if not np.isfinite(score):
        return Decision("NG", "the score is not a finite number")
    if rules is None or rules.empty or pixel_threshold is None:
        return Decision(label, _score_rule(label, score, threshold, review))
    regions = find_regions(amap, pixel_threshold, rules, preprocess, image_hw)
    if label == "OK":
        return Decision("OK", _score_rule(label, score, threshold, review), regions)
    counted = [r for r in regions if r.ignored is None]
    if counted:
        biggest = counted[0]
        return Decision(label, f"defect region at x={biggest.centre[0]}, y={biggest.centre[1]} "
                               f"({rules.area_text(biggest.area)})", regions)
    if not regions:   # the score is high but no pixel reaches the pixel threshold: nothing for the rules to clear
        return Decision(label, _score_rule(label, score, threshold, review) + "; no region reaches the pixel "
                                                                                "threshold", regions)
    why = sorted({r.ignored for r in regions})
    return Decision("OK", f"every region above the pixel threshold is {' or '.join(why)}", regions)


def _score_rule(label: str, score: float, threshold: float, review: float | None) -> str:
    if label == "NG":
        return f"score {score:.4g} at or above the threshold {threshold:.4g}"
    if label == "review":
        return f"score {score:.4g} in the review band from {review:.4g}"
    lowest = review if review is not None and review < threshold else threshold
    return f"score {score:.4g} below {'the review threshold' if lowest != threshold else 'the threshold'} {lowest:.4g}"

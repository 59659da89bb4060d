"""Pictures of one image's result, as the dashboard, the report and the live demo show them.

Built from :mod:`core.app.viz`: the heatmap overlay on the run's one colour scale, the ground-truth contour
(green) and the region predicted at the pixel threshold (cyan fill and contour), or for an NG image with no pixel
at the pixel threshold its hottest region (magenta contour), so that an NG image always shows why.
"""
from __future__ import annotations

import base64

import numpy as np
from PIL import Image

from ..data import png_bytes
from ..thresholds import is_anomalous
from .viz import draw_outline, overlay

GROUND_TRUTH = (0, 255, 0)
PREDICTED = (0, 220, 255)
REGION_OF_INTEREST = (255, 200, 0)
HOTTEST = (255, 0, 255)
OUTSIDE_DIMMING = 0.35
# The hottest region reaches down this share of the way from the map's peak to its median.
HOTTEST_SPAN = 0.3


def predicted_region(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Pixels flagged anomalous: the OK/NG rule of core.thresholds, applied to each pixel as the defect rules do."""
    return is_anomalous(amap, pixel_threshold)


def hottest_region(amap: np.ndarray, roi: np.ndarray | None = None) -> np.ndarray:
    """Where the map is hottest (inside the region of interest, when given): the pixels from its peak down to
    HOTTEST_SPAN of the way to its median. What an NG image shows when no pixel reaches the pixel threshold."""
    values = amap if roi is None else np.where(roi, amap, -np.inf)
    peak, median = float(values.max()), float(np.median(amap if roi is None else amap[roi]))
    return values >= peak - HOTTEST_SPAN * (peak - median)


def why_region(amap: np.ndarray, pixel_threshold: float, roi: np.ndarray | None = None,
               flagged: bool = False) -> tuple[np.ndarray, bool]:
    """The region a panel draws, and whether it is the hottest region: the pixels at the pixel threshold (inside the
    region of interest); for a flagged (NG) image without any, its hottest region instead."""
    region = predicted_region(amap, pixel_threshold)
    if roi is not None:
        region &= roi
    if flagged and not region.any() and (roi is None or roi.any()):
        return hottest_region(amap, roi), True
    return region, False


def heatmap_panel(image: np.ndarray, amap: np.ndarray, scale: tuple[float, float], alpha: float = 0.5,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """The map over the image on the run's scale, with the ground truth outlined when given."""
    out = overlay(image, amap, scale[0], scale[1], alpha)
    return out if mask is None or not mask.any() else draw_outline(out, mask, GROUND_TRUTH, _line(image))


def region_panel(image: np.ndarray, amap: np.ndarray, pixel_threshold: float,
                 mask: np.ndarray | None = None, roi: np.ndarray | None = None, flagged: bool = False) -> np.ndarray:
    """The image with the predicted region tinted and outlined, and the ground truth outlined; with a region
    of interest (in the image's frame), what lies outside it is dimmed and never tinted. A flagged (NG) image
    without a predicted region has its hottest region outlined instead (see :func:`why_region`)."""
    region, hottest = why_region(amap, pixel_threshold, roi, flagged)
    out = image.copy()
    if roi is not None:
        out[~roi] = (out[~roi] * OUTSIDE_DIMMING).astype(np.uint8)
        out = draw_outline(out, roi, REGION_OF_INTEREST, _line(image))
    if hottest:
        out = draw_outline(out, region, HOTTEST, _line(image))
    elif region.any():
        tint = np.array(PREDICTED, dtype=np.float32)
        out[region] = (out[region].astype(np.float32) * 0.55 + tint * 0.45).astype(np.uint8)
        out = draw_outline(out, region, PREDICTED, _line(image))
    if mask is not None and mask.any():
        out = draw_outline(out, mask, GROUND_TRUTH, _line(image))
    return out


def thumbnail(image: np.ndarray, size: int = 160) -> np.ndarray:
    """The image shrunk to fit a size x size box (aspect kept)."""
    pil = Image.fromarray(image)
    pil.thumbnail((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def data_uri(image: np.ndarray) -> str:
    """An inline PNG for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _line(image: np.ndarray) -> int:
    """Contour width that stays visible on big images."""
    return max(2, round(max(image.shape[:2]) / 200))

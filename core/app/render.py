"""Pictures of one image's result, as the dashboard, the report and the live demo show them.

Built from :mod:`core.app.viz`: the heatmap overlay on the run's one colour scale, the ground-truth contour
(green) and the region predicted at the pixel threshold (cyan fill and contour).
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
OUTSIDE_DIMMING = 0.35


def predicted_region(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Pixels flagged anomalous: the OK/NG rule of core.thresholds, applied to each pixel as the defect rules do."""
    return is_anomalous(amap, pixel_threshold)


def heatmap_panel(image: np.ndarray, amap: np.ndarray, scale: tuple[float, float], alpha: float = 0.5,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """The map over the image on the run's scale, with the ground truth outlined when given."""
    out = overlay(image, amap, scale[0], scale[1], alpha)
    return out if mask is None or not mask.any() else draw_outline(out, mask, GROUND_TRUTH, _line(image))


def region_panel(image: np.ndarray, amap: np.ndarray, pixel_threshold: float,
                 mask: np.ndarray | None = None, roi: np.ndarray | None = None) -> np.ndarray:
    """The image with the predicted region tinted and outlined, and the ground truth outlined; with a region
    of interest (in the image's frame), what lies outside it is dimmed and never tinted."""
    region = predicted_region(amap, pixel_threshold)
    out = image.copy()
    if roi is not None:
        region &= roi
        out[~roi] = (out[~roi] * OUTSIDE_DIMMING).astype(np.uint8)
        out = draw_outline(out, roi, REGION_OF_INTEREST, _line(image))
    if region.any():
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

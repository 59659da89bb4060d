"""Heatmap images with one colour scale per run (never per image, which makes good parts look bad)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from plotly.colors import sample_colorscale, unlabel_rgb
from PIL import Image

COLORSCALE = "Inferno"


@lru_cache(maxsize=4)
def colour_lut(name: str = COLORSCALE) -> np.ndarray:
    """(256, 3) uint8 lookup table sampled from a plotly colour scale."""
    samples = sample_colorscale(name, np.linspace(0, 1, 256))
    return np.array([unlabel_rgb(c) for c in samples], dtype=np.float64).round().astype(np.uint8)


def colourise(amap: np.ndarray, vmin: float, vmax: float, name: str = COLORSCALE) -> np.ndarray:
    """HxW float map -> HxWx3 uint8, with vmin/vmax fixed by the caller (the run's scale)."""
    span = max(float(vmax) - float(vmin), 1e-12)
    idx = np.clip((amap - vmin) / span, 0, 1) * 255
    return colour_lut(name)[idx.astype(np.uint8)]


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised map over an RGB image of the same size."""
    heat = colourise(amap, vmin, vmax).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask (for drawing ground truth or predicted regions)."""
    m = mask.astype(bool)
    interior = m.copy()
    interior[1:, :] &= m[:-1, :]
    interior[:-1, :] &= m[1:, :]
    interior[:, 1:] &= m[:, :-1]
    interior[:, :-1] &= m[:, 1:]
    return m & ~interior


def draw_outline(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0), width: int = 2) -> np.ndarray:
    edge = outline(mask)
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    out = image.copy()
    out[edge] = colour
    return out


def save_png(array: np.ndarray, path) -> None:
    Image.fromarray(array).save(path)


def heatmap_png(image: np.ndarray, amap: np.ndarray, vmax: float) -> bytes:
    """The heatmap overlay on the scale 0 to vmax, as PNG bytes: what predict, score and the service return
    (module level, so that Ray workers unpickle it by name)."""
    from ..data import png_bytes
    return png_bytes(overlay(image, amap, 0.0, vmax))

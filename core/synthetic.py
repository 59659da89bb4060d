"""Synthetic defects on normal images, for choosing settings and estimating misses without real defects.

Three well-known generator families, each deterministic given a numpy Generator:

- CutPaste (Li et al., CVPR 2021): a patch of the image itself, jittered in brightness and contrast and
  possibly turned half round, pasted elsewhere; its "scar" variant is a thin, long patch.
- Perlin-noise blends (DRAEM, Zavrtanik et al., ICCV 2021): a thresholded Perlin-noise region blended with a
  source texture. No texture dataset can be downloaded here, so the source is another, flipped, region of
  the same image, or smooth noise.
- Scratches: a thin random polyline drawn darker or lighter than its surroundings.

Sizes are relative to the image, so the same defect covers the same share of a 300 px and a 3,000 px image.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# Defect area as a share of the image area (log-uniform): a few pixels wide on a small board to a stain.
# Sizes and contrasts are drawn from subtle to plain: settings are told apart by the subtle ones.
AREA_RANGE = (0.001, 0.02)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of `shape`, with `cells` lattice cells along (rows, cols); values ~[-1, 1]."""
    h, w = shape
    ch, cw = cells
    angles = rng.uniform(0, 2 * np.pi, (ch + 1, cw + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, ch, h, endpoint=False)
    xs = np.linspace(0, cw, w, endpoint=False)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[y0[:, None] + dy, x0[None, :] + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (top * (1 - uy) + bottom * uy) * np.sqrt(2)


def _box(hw: tuple[int, int], area: float, aspect: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box of `area` (share of the image) and width/height `aspect`, inside."""
    h, w = hw
    bh = int(np.clip(round(np.sqrt(area * h * w / aspect)), 2, h - 1))
    bw = int(np.clip(round(area * h * w / bh), 2, w - 1))
    return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw


def cutpaste(image: np.ndarray, rng: np.random.Generator, scar: bool = False) -> tuple[np.ndarray, np.ndarray]:
    hw = image.shape[:2]
    area = float(np.exp(rng.uniform(*np.log(AREA_RANGE)))) * (0.3 if scar else 1.0)
    aspect = float(rng.uniform(6, 12)) if scar else float(np.exp(rng.uniform(np.log(0.3), np.log(3.3))))
    if rng.random() < 0.5:
        aspect = 1 / aspect if scar else aspect
    t, l, bh, bw = _box(hw, area, aspect, rng)
    patch = image[t:t + bh, l:l + bw].astype(np.float32)
    patch = patch * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)          # brightness and contrast jitter
    if rng.random() < 0.5:
        patch = patch[::-1, ::-1]
    t2, l2, _, _ = _box(hw, area, aspect, rng)
    out = image.copy()
    out[t2:t2 + bh, l2:l2 + bw] = np.clip(patch, 0, 255).astype(np.uint8)
    mask = np.zeros(hw, dtype=bool)
    mask[t2:t2 + bh, l2:l2 + bw] = True
    return out, mask


def perlin_blend(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Perlin-noise region, confined to a box of the drawn size, blended with another region of the image
    (flipped) or with smooth noise, at an opacity from faint to opaque."""
    h, w = image.shape[:2]
    area = float(np.exp(rng.uniform(*np.log(AREA_RANGE))))
    t, l, bh, bw = _box((h, w), area * 2.5, float(np.exp(rng.uniform(-0.8, 0.8))), rng)
    cells = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    noise = perlin_noise((bh, bw), cells, rng)
    region = noise > np.quantile(noise, 0.6)                  # about 40% of the box
    mask = np.zeros((h, w), dtype=bool)
    mask[t:t + bh, l:l + bw] = region
    if rng.random() < 0.5:
        t2, l2, _, _ = _box((h, w), area * 2.5, bw / bh, rng)
        source = image[t2:t2 + bh, l2:l2 + bw][::-1].astype(np.float32)
    else:
        tone = perlin_noise((bh, bw), (4, 4), rng)[..., None] * rng.uniform(20, 60)
        # A grey image gets a grey stain; a colour image a tint.
        grey = np.ptp(image[::8, ::8].astype(np.int16), axis=2).max() <= 8
        shift = rng.uniform(-40, 40, 1 if grey else 3)
        source = image[t:t + bh, l:l + bw].astype(np.float32).mean(axis=(0, 1)) + tone + shift
    opacity = float(rng.uniform(0.25, 0.9))
    out = image.astype(np.float32)
    box = out[t:t + bh, l:l + bw]
    box[region] = (1 - opacity) * box[region] + opacity * source[region]
    return np.clip(out, 0, 255).astype(np.uint8), mask


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    n = int(rng.integers(3, 7))
    start = rng.uniform([0, 0], [w, h])
    heading = rng.uniform(0, 2 * np.pi)
    points = [tuple(start)]
    for _ in range(n):
        heading += rng.normal(0, 0.4)
        step = side * rng.uniform(0.04, 0.1)
        points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
    width = max(1, int(round(side * rng.uniform(0.004, 0.012))))
    layer = Image.new("L", (w, h), 0)
    ImageDraw.Draw(layer).line(points, fill=255, width=width, joint="curve")
    mask = np.asarray(layer) > 0
    shade = float(rng.choice([-1, 1])) * rng.uniform(25, 80)
    out = image.astype(np.float32)
    out[mask] += shade
    return np.clip(out, 0, 255).astype(np.uint8), mask


GENERATORS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "cutpaste": cutpaste,
    "scar": lambda image, rng: cutpaste(image, rng, scar=True),
    "perlin": perlin_blend,
    "scratch": scratch,
}


def synthetic_defect(image: np.ndarray, rng: np.random.Generator, kind: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """(defective image, HxW bool mask, kind) from an HxWx3 uint8 normal image; a random kind when None.

    A defect that changes no pixel (a patch pasted onto identical content) is drawn again.
    """
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"synthetic defects need an HxWx3 image of at least 8 x 8 px, got shape {image.shape}")
    for _ in range(10):
        name = kind or str(rng.choice(sorted(GENERATORS)))
        out, mask = GENERATORS[name](image, rng)
        changed = np.abs(out.astype(np.int16) - image).max(axis=2) > 8
        if (changed & mask).sum() >= max(4, 0.2 * mask.sum()):
            return out, mask, name
    return out, mask, name

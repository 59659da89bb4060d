"""Small tensor operations shared by detectors."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def upsample_blur_matrix(grid: int, size: int, sigma: float) -> torch.Tensor:
    """(size, grid) matrix A such that A @ P @ A.T = Gaussian-blur(bilinear-upsample(P, size)).

    Bilinear resizing and Gaussian blurring are both linear and separable, so the two steps on a
    grid x grid map collapse into two small matrix products, much cheaper than a 2D convolution.
    The blur uses a kernel radius of 4 sigma and reflected borders (scipy's mode="mirror").
    """
    eye = torch.eye(grid, dtype=torch.float64)
    # Resizing only the height of an identity matrix gives the 1D bilinear operator.
    up = F.interpolate(eye[None, None], size=(size, grid), mode="bilinear", align_corners=False)[0, 0]
    if sigma <= 0:
        return up.float()
    radius = int(4 * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    columns = F.pad(up.T[:, None], (radius, radius), mode="reflect")      # (grid, 1, size + 2r)
    blurred = F.conv1d(columns, kernel.view(1, 1, -1))[:, 0].T            # (size, grid)
    return blurred.float()


def upsample_blur(maps: torch.Tensor, size: int | tuple[int, int], sigma: float) -> torch.Tensor:
    """(N, gh, gw) patch-score grids -> (N, H, W) maps (size: H = W, or (H, W)), upsampled then blurred."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    # Plain ints: an export traces the matrices as constants (and the cache finds them) whatever the sizes' type.
    rows = upsample_blur_matrix(int(maps.shape[-2]), h, float(sigma)).to(maps.dtype)
    cols = upsample_blur_matrix(int(maps.shape[-1]), w, float(sigma)).to(maps.dtype)
    return rows @ maps @ cols.T

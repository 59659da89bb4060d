"""Approximate greedy k-center coreset (PatchCore, Sec. 3.2), in bounded memory.

Features are projected by a fixed random linear map (Johnson-Lindenstrauss) so that each greedy step
costs one pass over N x `projection_dim` numbers; no N x N matrix is ever built.
"""
from __future__ import annotations

import numpy as np
import torch


def greedy_coreset(features: torch.Tensor, n_select: int, projection_dim: int | None = 128,
                   seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_select` rows of `features` (N, D) that cover the rest.

    Returns the selected indices in selection order and the coverage radius after each pick: the largest
    distance from any row to its nearest selected row (in the projected space), which only falls.
    """
    n = features.shape[0]
    n_select = int(min(max(n_select, 1), n))
    generator = torch.Generator().manual_seed(seed)
    z = features.float()
    if projection_dim and projection_dim < z.shape[1]:
        # Gaussian projection scaled so distances are preserved in expectation.
        proj = torch.randn(z.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5
        z = z @ proj
    sq_norms = (z * z).sum(1)
    min_sq = torch.full((n,), float("inf"))
    selected = np.empty(n_select, dtype=np.int64)
    radii = np.empty(n_select, dtype=np.float32)
    current = int(torch.randint(n, (1,), generator=generator))
    step = max(1, n_select // 100)
    for i in range(n_select):
        selected[i] = current
        centre = z[current]
        # |a - c|^2 = |a|^2 - 2 a.c + |c|^2: one matrix-vector product per step.
        torch.minimum(min_sq, sq_norms - 2 * (z @ centre) + centre.dot(centre), out=min_sq)
        current = int(torch.argmax(min_sq))
        radii[i] = float(min_sq[current].clamp_min(0).sqrt())
        if progress is not None and (i % step == 0 or i == n_select - 1):
            progress("coreset", i + 1, n_select)
    return selected, radii

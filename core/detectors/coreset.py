"""Approximate greedy k-center coreset (PatchCore, Sec. 3.2), in bounded memory and streamed.

Features are projected by a fixed random linear map (Johnson-Lindenstrauss) as in the paper; the greedy
step then picks the point farthest from the selected set. No N x N matrix is ever built.

Each step only revisits points that the new centre can possibly claim: a point at distance d from its
nearest centre a cannot get closer to a new centre c when |c - a| >= 2 d (triangle inequality). On real
patch features, which cluster tightly, this skips most points after the first few hundred picks and gives
the same selection as the plain algorithm several times faster.

Greedy selection costs O(N * picks), so :class:`StreamingCoreset` reduces the training patches chunk by
chunk as the backbone produces them: each chunk of at most `chunk_rows` patches gets its share of the picks
(a composable coreset: the union of the chunks' coresets covers every patch within the largest chunk
radius). Fit time then grows linearly with the number of images and memory with the bank, not with the
training set.
"""
from __future__ import annotations

import numpy as np
import torch


def project(features: torch.Tensor, projection_dim: int | None, seed: int) -> np.ndarray:
    """Gaussian random projection to `projection_dim` columns (distances preserved in expectation)."""
    z = features.float()
    if projection_dim and projection_dim < z.shape[1]:
        generator = torch.Generator().manual_seed(seed)
        z = z @ (torch.randn(z.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5)
    return np.ascontiguousarray(z.numpy(), dtype=np.float32)


def greedy_coreset(features: torch.Tensor, n_select: int, projection_dim: int | None = 128,
                   seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_select` rows of `features` (N, D) that cover the rest.

    Returns the selected indices and the coverage radius after each pick: the largest distance from any
    row to its nearest selected row (in the projected space), which never rises.
    """
    z = project(features, projection_dim, seed)
    n_select = int(min(max(n_select, 1), z.shape[0]))
    return _greedy(z, n_select, np.random.default_rng(seed), progress)


class StreamingCoreset:
    """Greedy coreset of a stream of feature rows, reduced chunk by chunk (see the module docstring).

    `n_total` rows will arrive in all; `n_select` of them are kept, each chunk's share in proportion to its
    rows. Call :meth:`add` with each batch of rows, then :meth:`finish`.
    """

    def __init__(self, n_total: int, n_select: int, projection_dim: int | None = 128, seed: int = 0,
                 progress=None, chunk_rows: int = 100_000):
        self.n_total, self.n_select = int(n_total), int(min(max(n_select, 1), n_total))
        self.projection_dim, self.seed, self.progress = projection_dim, seed, progress
        self.chunk_rows = int(chunk_rows)
        self._pending: list[torch.Tensor] = []
        self._pending_rows = self._seen = self._kept = 0
        self._picks: list[torch.Tensor] = []   # the kept rows of each chunk, in pick order
        self._radii: list[np.ndarray] = []

    def add(self, rows: torch.Tensor) -> None:
        self._pending.append(rows)
        self._pending_rows += len(rows)
        if self._pending_rows >= self.chunk_rows:
            self._reduce()

    def _reduce(self) -> None:
        chunk = torch.cat(self._pending)
        self._pending, self._pending_rows = [], 0
        self._seen += len(chunk)
        # Shares by cumulative rounding, so that they add up to n_select exactly.
        share = int(round(self.n_select * min(self._seen, self.n_total) / self.n_total)) - self._kept
        share = max(1, min(share, len(chunk)))
        self._kept += share
        offset = sum(len(p) for p in self._picks)

        def chunk_progress(stage, done, total):
            if self.progress is not None:
                self.progress(stage, offset + done, self.n_select)
        selected, radii = greedy_coreset(chunk, share, self.projection_dim, self.seed + len(self._picks),
                                         chunk_progress)
        self._picks.append(chunk[torch.from_numpy(selected)].clone())
        self._radii.append(radii)

    def finish(self) -> tuple[torch.Tensor, np.ndarray]:
        """The kept rows (n_select, D), and after each pick an upper bound of the coverage radius.

        Picks are interleaved round-robin over the chunks; the bound after each round is the largest
        radius any chunk has reached, which covers the union.
        """
        if self._pending:
            self._reduce()
        if not self._picks:
            raise ValueError("no feature rows were added")
        if len(self._picks) == 1:
            return self._picks[0], self._radii[0]
        rounds = max(len(p) for p in self._picks)
        rows, bound = [], []
        for i in range(rounds):
            in_round = [k for k, p in enumerate(self._picks) if i < len(p)]
            rows += [self._picks[k][i] for k in in_round]
            bound += [max(r[min(i, len(r) - 1)] for r in self._radii)] * len(in_round)
        return torch.stack(rows), np.array(bound, dtype=np.float32)


def _greedy(z: np.ndarray, n_select: int, rng: np.random.Generator, progress) -> tuple[np.ndarray, np.ndarray]:
    n = z.shape[0]
    sq_norms = (z * z).sum(1)
    selected = np.empty(n_select, dtype=np.int64)
    radii = np.empty(n_select, dtype=np.float32)
    centres = np.empty((n_select, z.shape[1]), dtype=np.float32)
    centre_sq = np.empty(n_select, dtype=np.float32)
    nearest = np.zeros(n, dtype=np.int64)            # index (into centres) of each point's nearest centre
    min_dist = np.full(n, np.inf, dtype=np.float32)  # distance to that centre
    current = int(rng.integers(n))
    step = max(1, n_select // 100)
    for i in range(n_select):
        selected[i] = current
        centre = centres[i] = z[current]
        centre_sq[i] = sq_norms[current]
        if i:
            # Distances from the new centre to the earlier ones, as one matrix-vector product, rounded down
            # by more than float32's error in the expanded form: a low gap only adds candidates.
            scale = centre_sq[:i] + centre_sq[i]
            gap = np.sqrt(np.maximum(scale - 2 * (centres[:i] @ centre) - 1e-5 * scale, 0))
            candidates = np.flatnonzero(gap[nearest] < 2 * min_dist)
        if not i or len(candidates) > n // 4:
            # Most points are candidates: one matrix-vector product beats gathering rows.
            candidates = np.arange(n)
            dist = np.sqrt(np.maximum(sq_norms - 2 * (z @ centre) + centre_sq[i], 0))
        else:
            dist = np.sqrt(((z[candidates] - centre) ** 2).sum(1))
        closer = dist < min_dist[candidates]
        claimed = candidates[closer]
        min_dist[claimed] = dist[closer]
        nearest[claimed] = i
        min_dist[current] = 0  # exactly, whatever the float error of the expanded distance
        current = int(np.argmax(min_dist))
        radii[i] = min_dist[current]
        if progress is not None and (i % step == 0 or i == n_select - 1):
            progress("coreset", i + 1, n_select)
    return selected, radii

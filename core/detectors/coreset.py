"""Approximate greedy k-center coreset (PatchCore, Sec. 3.2), in bounded memory and streamed.

Features are projected by a fixed random linear map (Johnson-Lindenstrauss) as in the paper; the greedy
step then picks the point farthest from the selected set. No N x N matrix is ever built.

The plain greedy reads every point once per pick; :func:`_greedy` makes the same picks several per pass
(see there), so the data is read once per pass and the work is a matrix product.

Greedy selection costs O(N * picks), so :class:`StreamingCoreset` reduces the training patches chunk by
chunk as the backbone produces them: each chunk of at most `chunk_rows` patches gets its share of the picks
(a composable coreset: the union of the chunks' coresets covers every patch within the largest chunk
radius). Fit time then grows linearly with the number of images and memory with the bank, not with the
training set.
"""
from __future__ import annotations

import numpy as np
import torch

# The greedy's pool of farthest points per pass, and the rows per matrix product when a pass updates every point.
POOL, UPDATE_ROWS = 4096, 4096


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
        # Each chunk's radii held at their last value once it runs out of picks; a round's bound is their max.
        bound = np.stack([np.pad(r, (0, rounds - len(r)), mode="edge") for r in self._radii]).max(axis=0)
        pick_round = np.concatenate([np.arange(len(p)) for p in self._picks])
        order = np.argsort(pick_round, kind="stable")   # round by round, chunks in order within a round
        return torch.cat(self._picks)[torch.from_numpy(order)], bound[pick_round[order]].astype(np.float32)


def _greedy(z: np.ndarray, n_select: int, rng: np.random.Generator, progress) -> tuple[np.ndarray, np.ndarray]:
    """The plain greedy's picks (up to ties), several per pass over the data.

    Each pass takes the POOL points farthest from the centres so far. Within the pool the greedy steps run
    exactly (the pool's distances are updated by every pick); a point outside it is no farther than the
    farthest point left out (`bound`) and can only get nearer, so while the pool's farthest point is at least
    `bound` it is the farthest of all, which is the plain greedy's next pick. When it falls below, one matrix
    product updates every point with the pass's picks: the data is read once per pass instead of once per pick.
    Measured on 100,000 patches at 224 px, 10% picked: bottle 2.6 s one pick at a time, magnetic tile 15.8 s;
    2.4 and 2.3 s so. A pruned one-pick-at-a-time tail for clustered features no longer paid once the pass
    product was fused (bottle 10%: 2.42 s with it, 2.44 s without; 20%: 4.34 against 4.70 s).
    """
    n = z.shape[0]
    data = torch.from_numpy(z)
    sq_norms = (data * data).sum(1)
    min_sq = torch.full((n,), float("inf"))       # squared distance of each point to its nearest centre
    selected = np.empty(n_select, dtype=np.int64)
    radii = np.empty(n_select, dtype=np.float32)
    picks = [int(rng.integers(n))]
    done = 0
    while True:
        centres, centre_sq = data[picks], sq_norms[picks]
        for start in range(0, n, UPDATE_ROWS):    # bounds the (rows x picks) distance matrix
            rows = slice(start, start + UPDATE_ROWS)
            # |c|^2 - 2 z.c in one product; a row's own |z|^2 does not change which centre is nearest, so it is
            # added after the min (half the time of forming every full distance).
            best = torch.addmm(centre_sq[None], data[rows], centres.T, alpha=-2).amin(1)
            torch.minimum(min_sq[rows], best.add_(sq_norms[rows]).clamp_min_(0), out=min_sq[rows])
        min_sq[picks] = 0                          # exactly, whatever the float error of the expanded form
        selected[done:done + len(picks)] = picks
        done += len(picks)
        if progress is not None:
            progress("coreset", done, n_select)
        if done == n_select:
            radii[-1] = float(min_sq.max().sqrt())
            return selected, radii
        size = min(POOL, n - 1)
        top, pool = torch.topk(min_sq, size + 1)
        radii[done - 1] = float(top[0].sqrt())
        bound = float(top[-1])
        pool = pool[:-1].numpy()
        pool_sq = top[:-1].numpy().copy()
        pool_z = z[pool]
        pool_norms = sq_norms.numpy()[pool]
        picks = []
        while True:
            j = int(np.argmax(pool_sq))
            if picks:
                if pool_sq[j] < bound:
                    break
                radii[done + len(picks) - 1] = np.sqrt(pool_sq[j])
            picks.append(int(pool[j]))
            if done + len(picks) == n_select:
                break
            np.minimum(pool_sq, np.maximum(pool_norms - 2 * (pool_z @ pool_z[j]) + pool_norms[j], 0), out=pool_sq)
            pool_sq[j] = 0

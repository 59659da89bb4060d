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

# The greedy's pool of farthest points per pass, and the rows per matrix product when a pass updates every point;
# below this share of points a new centre could claim, picking one at a time is cheaper.
POOL, UPDATE_ROWS, PRUNED_SHARE = 4096, 8192, 0.02
# The next picks (the pool's farthest points) that share is averaged over: one alone misjudged spread features.
PRUNE_PROBES = 16


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
    """The plain greedy's picks (up to ties), several per pass over the data while that pays, then one by one.

    Each pass takes the POOL points farthest from the centres so far. Within the pool the greedy steps run
    exactly (the pool's distances are updated by every pick); a point outside it is no farther than the
    farthest point left out (`bound`) and can only get nearer, so while the pool's farthest point is at least
    `bound` it is the farthest of all, which is the plain greedy's next pick. When it falls below, one matrix
    product updates every point with the pass's picks: the data is read once per pass instead of once per pick.

    Once a new centre could claim only a few points (PRUNED_SHARE; the triangle inequality rules the rest out,
    see `_pruned_steps`), the steps go on one at a time touching only those: clustered features (bottle: an
    object on a plain background) get there early, spread ones (magnetic tile's texture) seldom. Measured on
    100,000 patches at 224 px, 10% picked: bottle 2.6 s one by one only, 5.5 s in passes only, 2.5 s so;
    magnetic tile 15.8 s, 5.9 s and 4.7 to 5.1 s.
    """
    n = z.shape[0]
    data = torch.from_numpy(z)
    sq_norms = (data * data).sum(1)
    min_sq = torch.full((n,), float("inf"))       # squared distance of each point to its nearest centre
    nearest = torch.zeros(n, dtype=torch.int64)   # the position in `selected` of that centre
    selected = np.empty(n_select, dtype=np.int64)
    radii = np.empty(n_select, dtype=np.float32)
    picks = [int(rng.integers(n))]
    done = 0
    while True:
        centres, centre_sq = data[picks], sq_norms[picks]
        for start in range(0, n, UPDATE_ROWS):    # bounds the (rows x picks) distance matrix
            rows = slice(start, start + UPDATE_ROWS)
            best, which = (sq_norms[rows, None] - 2 * data[rows] @ centres.T + centre_sq[None]).clamp_min_(0).min(1)
            closer = best < min_sq[rows]
            min_sq[rows] = torch.where(closer, best, min_sq[rows])
            nearest[rows] = torch.where(closer, which + done, nearest[rows])
        min_sq[picks] = 0                          # exactly, whatever the float error of the expanded form
        nearest[picks] = torch.arange(done, done + len(picks))
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
        min_dist, owner, norms = min_sq.sqrt().numpy(), nearest.numpy(), sq_norms.numpy()
        if _claimable_share(z, norms, selected[:done], pool[:PRUNE_PROBES].numpy(), min_dist, owner) < PRUNED_SHARE:
            return _pruned_steps(z, norms, selected, radii, done, min_dist.copy(), owner.copy(), int(pool[0]),
                                 progress)
        bound = float(top[-1])
        pool = pool[:-1].numpy()
        pool_sq = top[:-1].numpy().copy()
        pool_z = z[pool]
        pool_norms = norms[pool]
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


def _centre_gaps(centres: np.ndarray, centre_sq: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Distances from `centre` to each of `centres` (squared norms `centre_sq`), rounded down by more than
    float32's error in the expanded form: a low gap only adds candidates."""
    scale = centre_sq + centre @ centre
    return np.sqrt(np.maximum(scale - 2 * (centres @ centre) - 1e-5 * scale, 0))


def _claimable_share(z: np.ndarray, sq_norms: np.ndarray, centres: np.ndarray, new: np.ndarray,
                     min_dist: np.ndarray, nearest: np.ndarray) -> float:
    """The mean share of points each of the `new` centres could claim: a point at distance d from its nearest
    centre a cannot get closer to a new centre c when |c - a| >= 2 d (triangle inequality)."""
    points, points_sq = z[centres], sq_norms[centres]
    return float(np.mean([np.mean(_centre_gaps(points, points_sq, z[c])[nearest] < 2 * min_dist) for c in new]))


def _pruned_steps(z: np.ndarray, sq_norms: np.ndarray, selected: np.ndarray, radii: np.ndarray, done: int,
                  min_dist: np.ndarray, nearest: np.ndarray, current: int,
                  progress) -> tuple[np.ndarray, np.ndarray]:
    """The remaining greedy steps one pick at a time, each revisiting only the points the new centre can claim."""
    n, n_select = len(z), len(selected)
    centres = np.empty((n_select, z.shape[1]), dtype=np.float32)
    centres[:done] = z[selected[:done]]
    centre_sq = np.empty(n_select, dtype=np.float32)
    centre_sq[:done] = sq_norms[selected[:done]]
    step = max(1, n_select // 100)
    for i in range(done, n_select):
        selected[i] = current
        centre = centres[i] = z[current]
        centre_sq[i] = sq_norms[current]
        candidates = np.flatnonzero(_centre_gaps(centres[:i], centre_sq[:i], centre)[nearest] < 2 * min_dist)
        if len(candidates) > n // 4:
            # Most points are candidates: one matrix-vector product beats gathering rows.
            candidates = np.arange(n)
            dist = np.sqrt(np.maximum(sq_norms - 2 * (z @ centre) + sq_norms[current], 0))
        else:
            dist = np.sqrt(((z[candidates] - centre) ** 2).sum(1))
        closer = dist < min_dist[candidates]
        claimed = candidates[closer]
        min_dist[claimed] = dist[closer]
        nearest[claimed] = i
        min_dist[current] = 0   # exactly, whatever the float error of the expanded distance
        current = int(np.argmax(min_dist))
        radii[i] = min_dist[current]
        if progress is not None and (i % step == 0 or i == n_select - 1):
            progress("coreset", i + 1, n_select)
    return selected, radii

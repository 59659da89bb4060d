"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Every patch position of the (aligned) training images gets its own multivariate Gaussian over pretrained
features; a test patch scores its Mahalanobis distance to the Gaussian at its position. Features come from
several backbone stages, upsampled to the finest stage's grid and concatenated, then reduced to a fixed
random subset of `n_features` channels (the paper's "Rd" reduction, drawn once with `seed`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import DEFAULT_BACKBONE
from ..data import image_batches
from .base import BackboneDetector, Progress, register_detector, resolve_device, store_params
from .ops import upsample_blur


def stage_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """(N, C, h, w): the stages' maps upsampled (bilinear) to the first (finest) grid and concatenated."""
    grid = features[0].shape[-2:]
    return torch.cat([f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                      for f in features], dim=1)


def mahalanobis(emb: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N, P) distances of embeddings (N, P, d) to per-position Gaussians mean (P, d), precision (P, d, d)."""
    diff = (emb - mean[None]).transpose(0, 1)                        # (P, N, d)
    sq = torch.einsum("pnc,pcd,pnd->pn", diff, precision, diff)      # bmm per position
    return sq.clamp_min(0).sqrt().transpose(0, 1)


def position_gaussians(embeddings: Iterable[torch.Tensor], epsilon: float,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A Gaussian per grid position over batches of embeddings (B, d, h, w): means (P, d) and precisions
    (P, d, d) of the covariances plus epsilon I, float32 on the CPU, and the grid (h, w)."""
    # Streaming sums in float64: memory stays O(P d^2) however many images there are.
    n, s1, s2, grid = 0, None, None, None
    for emb in embeddings:
        grid = tuple(emb.shape[-2:])
        emb = emb.to(device).double().flatten(2).transpose(1, 2)                     # (B, P, d)
        if s1 is None:
            s1 = torch.zeros(emb.shape[1:], dtype=torch.float64, device=device)
            s2 = torch.zeros(emb.shape[1], emb.shape[2], emb.shape[2], dtype=torch.float64, device=device)
        s1 += emb.sum(0)
        e = emb.transpose(0, 1)                                                         # (P, B, d)
        s2 += e.transpose(1, 2) @ e
        n += len(emb)
    if n < 2:
        raise ValueError("a Gaussian per position needs at least 2 images to estimate covariances")
    mean = s1 / n
    cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
    cov += epsilon * torch.eye(cov.shape[-1], dtype=torch.float64, device=device)
    precision = torch.linalg.inv(cov)
    # Contiguous, as saved: a batched inverse comes back column-major, and a different memory layout would
    # change the summation order (and the last bits of the scores) after a save/load round trip. Exactly
    # symmetric, so that only its lower triangle needs saving (half the model file).
    precision = ((precision + precision.transpose(1, 2)) / 2).float().cpu().contiguous()
    return mean.float().cpu().contiguous(), precision, grid


def check_gaussian_params(n_features: int | None, epsilon: float) -> None:
    if n_features is not None and n_features < 1:
        raise ValueError(f"n_features must be None or >= 1, got {n_features}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (it keeps covariances invertible), got {epsilon}")


def random_channels(total: int, n_features: int | None, seed: int) -> torch.Tensor:
    """The paper's random channel subset: n_features of `total` channel indices (all for None), drawn with
    `seed`, sorted."""
    d = total if n_features is None else min(int(n_features), total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:d].sort().values


def lower_triangle(matrices: torch.Tensor) -> torch.Tensor:
    """(P, d (d + 1) / 2) lower triangles of symmetric matrices (P, d, d): half the bytes on disk."""
    rows, cols = torch.tril_indices(*matrices.shape[1:])
    return matrices[:, rows, cols]


def from_lower_triangle(lower: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric matrices (P, d, d) back from their lower triangles."""
    rows, cols = torch.tril_indices(d, d)
    full = lower.new_zeros((len(lower), d, d))
    full[:, rows, cols] = lower
    full[:, cols, rows] = lower
    return full.contiguous()


@register_detector("padim", family="representation", summary=(
                   "Fits a Gaussian to the features at each position of good images; quick, best when parts "
                   "are aligned the same way."))
class PaDiM(BackboneDetector):
    """PaDiM anomaly detector: a Gaussian per patch position, Mahalanobis distance as the score.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
        Default: EfficientNet-Lite0 stages 1, 2, 3 (strides 4, 8, 16; 24 + 40 + 112 = 176 channels).
    resize : the longer side of the input, the training images' aspect ratio kept ("auto", or (h, w) for an
        exact frame; see PatchCore). 256 by default: the statistics per position grow with the grid.
    crop : centre crop after resizing; None (default) keeps the whole image, defects at the border included.
    n_features : size d of the random channel subset (the paper's Rd); None or >= all channels keeps all.
    epsilon : ridge added to every covariance (paper: 0.01 I).
    blur_sigma : Gaussian blur of the upsampled distance map (paper: 4).
    seed : draws the channel subset.

    Attributes
    ----------
    channel_idx_ : (d,) int64 indices of the kept channels.
    mean_ : (P, d) float32 per-position means, P = h * w grid positions.
    precision_ : (P, d, d) float32 inverses of the regularised covariances.
    grid_ : (h, w) of the feature grid.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2, 3), weights: str | None = None,
                 resize: int | str | tuple = 256, crop: int | None = None, n_features: int | None = 100, epsilon: float = 0.01,
                 blur_sigma: float = 4.0, calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        self._require_stages()
        check_gaussian_params(self.n_features, self.epsilon)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d, h, w) reduced embeddings of a preprocessed batch, on the detector's device."""
        emb = stage_embedding(self.backbone_features(x)).float()
        return emb.index_select(1, self.channel_idx_.to(emb.device))

    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        if len(images) < 2:
            raise ValueError("PaDiM needs at least 2 training images to estimate covariances")
        self.channel_idx_ = random_channels(sum(self.feature_extractor().channels), self.n_features, self.seed)

        def embeddings():
            for start, batch in image_batches(images, batch_size):
                with torch.no_grad():
                    yield self.embed(self.preprocess.images_to_tensor(batch))
                progress("features", start + len(batch), len(images))

        self.mean_, self.precision_, self.grid_ = position_gaussians(embeddings(), self.epsilon,
                                                                     resolve_device(self.device))
        progress("gaussians", 1, 1)
        self._move()

    def _move(self) -> None:
        dev = resolve_device(self.device)
        self._mean_dev, self._precision_dev = self.mean_.to(dev), self.precision_.to(dev)

    def score_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x).flatten(2).transpose(1, 2)
        dist = mahalanobis(emb, self._mean_dev, self._precision_dev).cpu()
        maps = upsample_blur(dist.reshape(-1, *self.grid_), tuple(x.shape[-2:]), self.blur_sigma)
        return maps.flatten(1).max(1).values, maps

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"channel_idx": self.channel_idx_, "mean": self.mean_,
                "precision_lower": lower_triangle(self.precision_)}

    def _fitted_json(self) -> dict:
        return {"grid": list(self.grid_)}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.channel_idx_ = tensors["channel_idx"]
        self.mean_ = tensors["mean"]
        if "precision" in tensors:          # models saved before the precision was stored as a triangle
            self.precision_ = tensors["precision"]
        else:
            self.precision_ = from_lower_triangle(tensors["precision_lower"], self.mean_.shape[1])
        self.grid_ = tuple(fitted["grid"])
        self._move()

    def _card_extra(self) -> dict:
        ex = self.feature_extractor()
        return {"gaussians": {"grid": list(self.grid_), "positions": int(self.mean_.shape[0]),
                              "dim": int(self.mean_.shape[1]), "of_channels": int(sum(ex.channels)),
                              "channel_subset": "random, drawn with seed", "covariance_ridge": self.epsilon},
                "score": "Mahalanobis distance per position, bilinear upsample + Gaussian blur; image = max of map"}

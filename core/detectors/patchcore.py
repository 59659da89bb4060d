"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two mid-level backbone stages, a greedy coreset memory bank, and
nearest-neighbour distances as anomaly scores; follows the paper and amazon-science/patchcore-inspection.
"""
from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import DEFAULT_BACKBONE, FeatureExtractor
from ..coreset import greedy_coreset
from .base import BackboneDetector, Progress, register_detector
from .ops import upsample_blur


def locally_aware_patches(features: list[torch.Tensor]) -> torch.Tensor:
    """(N, C, h, w) patch embeddings from stage maps, at the first (finest) stage's grid.

    Each position is averaged over its 3x3 neighbourhood (the paper's p = 3), deeper stages are
    upsampled bilinearly to the finest grid, and the stages are concatenated along channels.
    """
    grid = features[0].shape[-2:]
    pooled = []
    for f in features:
        f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        if f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        pooled.append(f)
    return torch.cat(pooled, dim=1)


@register_detector("patchcore", family="representation")
class PatchCore(BackboneDetector):
    """PatchCore anomaly detector.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
    resize, crop : input geometry (resize to `resize` square, centre crop `crop`; crop None = no crop).
    coreset_ratio : fraction of training patches kept in the memory bank (paper: 0.01 to 0.1). The default
        1% keeps fitting within seconds and nearest-neighbour search cheaper than the backbone; the paper
        reports PatchCore-1% within 0.1 image AUROC points of 10% on MVTec.
    projection_dim : random projection width used only for coreset selection.
    reweight : apply the paper's Eq. 7 to the image score, using `n_reweight` bank neighbours.
    blur_sigma : Gaussian blur of the upsampled anomaly map (paper: 4).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (2, 3), weights: str | None = None,
                 resize: int = 256, crop: int | None = 224, coreset_ratio: float = 0.01,
                 projection_dim: int = 128, reweight: bool = True, n_reweight: int = 9,
                 blur_sigma: float = 4.0, seed: int = 0, device: str = "auto"):
        self.backbone = backbone
        self.stages = stages
        self.weights = weights
        self.resize = resize
        self.crop = crop
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.reweight = reweight
        self.n_reweight = n_reweight
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.device = device

    def _validate(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        self._require_stages()
        self._require_positive("n_reweight")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) locally aware patch embeddings of a preprocessed batch."""
        return locally_aware_patches(self.backbone_features(x)).float().cpu()

    def embed_images(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> torch.Tensor:
        """(N, h, w, C) patch embeddings of raw images, computed in batches."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
            out.append(self.embed(self.preprocess.images_to_tensor(batch)).permute(0, 2, 3, 1))
            progress("features", start + len(batch), len(images))
        return torch.cat(out)

    def _fit(self, images: Sequence[np.ndarray], progress: Progress) -> None:
        self._validate()
        patches = self.embed_images(images, progress)
        self.grid_ = tuple(patches.shape[1:3])
        flat = patches.reshape(-1, patches.shape[-1])
        n_select = max(1, int(round(self.coreset_ratio * flat.shape[0])))
        selected, radii = greedy_coreset(flat, n_select, self.projection_dim, self.seed, progress)
        self.memory_bank_ = flat[torch.from_numpy(selected)].contiguous()
        self.coverage_radii_ = torch.from_numpy(radii)
        self.n_train_patches_ = int(flat.shape[0])
        self._build_index()

    def _build_index(self) -> None:
        bank = self.memory_bank_.numpy().astype(np.float32)
        self._index = faiss.IndexFlatL2(bank.shape[1])
        self._index.add(bank)
        if self.reweight:
            # Eq. 7 needs each bank patch's nearest bank neighbours; the first is the patch itself.
            k = min(self.n_reweight, len(bank))
            _, self._bank_neighbours = self._index.search(bank, k)

    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        emb = self.embed(x)
        n, c, h, w = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, c).numpy()
        sq_dist, nearest = self._index.search(np.ascontiguousarray(queries), 1)
        # IndexFlatL2 returns squared distances.
        patch_scores = np.sqrt(np.maximum(sq_dist[:, 0], 0)).reshape(n, h * w)
        worst = patch_scores.argmax(axis=1)
        scores = patch_scores[np.arange(n), worst]
        if self.reweight:
            scores = scores * self._eq7_weights(queries.reshape(n, h * w, c)[np.arange(n), worst],
                                                nearest[:, 0].reshape(n, h * w)[np.arange(n), worst])
        maps = upsample_blur(torch.from_numpy(patch_scores.reshape(n, h, w)), x.shape[-1], self.blur_sigma)
        return scores.astype(np.float32), maps.numpy().astype(np.float32)

    def _eq7_weights(self, worst_patches: np.ndarray, worst_nearest: np.ndarray) -> np.ndarray:
        """w = 1 - softmax of distances to the nearest bank patch's b neighbours, taken at that patch."""
        support = self.memory_bank_.numpy()[self._bank_neighbours[worst_nearest]]     # (n, b, c)
        dist = np.linalg.norm(support - worst_patches[:, None, :], axis=2)
        dist = np.exp(dist - dist.max(axis=1, keepdims=True))  # softmax is shift invariant; avoids overflow
        return 1.0 - dist[:, 0] / dist.sum(axis=1)

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_, "coverage_radii": self.coverage_radii_}

    def _fitted_json(self) -> dict:
        return {"grid": list(self.grid_), "n_train_patches": self.n_train_patches_}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.memory_bank_ = tensors["memory_bank"]
        self.coverage_radii_ = tensors["coverage_radii"]
        self.grid_ = tuple(fitted["grid"])
        self.n_train_patches_ = fitted["n_train_patches"]
        self._build_index()

    def _card_extra(self) -> dict:
        ex = self.feature_extractor()
        return {"backbone": {"name": self.backbone, "stages": list(self.stages), "channels": list(ex.channels),
                             "strides": list(ex.strides)},
                "memory_bank": {"patches": int(self.memory_bank_.shape[0]), "dim": int(self.memory_bank_.shape[1]),
                                "from_training_patches": self.n_train_patches_,
                                "coverage_radius": float(self.coverage_radii_[-1])}}

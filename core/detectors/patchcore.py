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
from ..coreset import StreamingCoreset
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


def ivf_centroids(bank: torch.Tensor, seed: int) -> torch.Tensor:
    """k-means cells for an IVF index over the bank: 4 sqrt(N) of them, the low end of faiss's advice."""
    x = bank.numpy().astype(np.float32)
    n_cells = int(min(len(x) // 39, 4 * np.sqrt(len(x))))   # faiss wants >= 39 training points per cell
    kmeans = faiss.Kmeans(x.shape[1], max(1, n_cells), niter=20, seed=int(seed) + 1)
    kmeans.train(x)
    return torch.from_numpy(kmeans.centroids.copy())


@register_detector("patchcore", family="representation")
class PatchCore(BackboneDetector):
    """PatchCore anomaly detector.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
    resize : input size. "auto" (default): the training images' aspect ratio kept, the longer side their own
        median longer side within 256 to 512 px (bottle's 900 px images -> 512 x 512, 640 px boards -> 512,
        a 1260 x 500 part -> 512 x 192). An int sets the longer side (aspect kept); (h, w) sets the frame.
    crop : centre crop after resizing (the paper: 224 of 256); None (default) keeps the whole image, so a
        defect at the border is scored.
    coreset_ratio : fraction of training patches kept in the memory bank (paper: 0.01 to 0.1). The default
        1% keeps fitting within seconds and nearest-neighbour search cheaper than the backbone; the paper
        reports PatchCore-1% within 0.1 image AUROC points of 10% on MVTec.
    min_bank : the bank keeps at least this many patches (or all of them), whatever the ratio: 1% of a
        25-image set would leave a few hundred patches to describe every normal variation.
    projection_dim : random projection width used only for coreset selection.
    search : nearest-neighbour index. "exact" (faiss flat L2), "ivf" (inverted lists over k-means cells of
        the bank, `nprobe` cells searched per patch), or "auto" (default): exact below `ivf_min_bank`
        patches, where it costs less than the backbone, IVF above.
    reweight : apply the paper's Eq. 7 to the image score, using `n_reweight` bank neighbours.
    blur_sigma : Gaussian blur of the upsampled anomaly map (paper: 4).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (2, 3), weights: str | None = None,
                 resize: int | str | tuple = "auto", crop: int | None = None, coreset_ratio: float = 0.01,
                 min_bank: int = 2000, projection_dim: int = 128, search: str = "auto", nprobe: int = 16,
                 ivf_min_bank: int = 20000, reweight: bool = True, n_reweight: int = 9,
                 blur_sigma: float = 4.0, seed: int = 0, device: str = "auto"):
        self.backbone = backbone
        self.stages = stages
        self.weights = weights
        self.resize = resize
        self.crop = crop
        self.coreset_ratio = coreset_ratio
        self.min_bank = min_bank
        self.projection_dim = projection_dim
        self.search = search
        self.nprobe = nprobe
        self.ivf_min_bank = ivf_min_bank
        self.reweight = reweight
        self.n_reweight = n_reweight
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.device = device

    def _validate(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        self._require_stages()
        self._require_positive("n_reweight", "min_bank", "nprobe", "ivf_min_bank")
        if self.search not in ("auto", "exact", "ivf"):
            raise ValueError(f"search must be 'auto', 'exact' or 'ivf', not {self.search!r}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) locally aware patch embeddings of a preprocessed batch."""
        return locally_aware_patches(self.backbone_features(x)).float().cpu()

    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        self._validate()
        coreset = None
        for start in range(0, len(images), batch_size):
            batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
            emb = self.embed(self.preprocess.images_to_tensor(batch))
            if coreset is None:
                # Every image has the model's frame, so the patch count is known from the first batch.
                self.grid_ = tuple(emb.shape[-2:])
                self.n_train_patches_ = len(images) * self.grid_[0] * self.grid_[1]
                n_select = max(round(self.coreset_ratio * self.n_train_patches_), int(self.min_bank))
                coreset = StreamingCoreset(self.n_train_patches_, n_select, self.projection_dim, self.seed, progress)
            coreset.add(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
            progress("features", start + len(batch), len(images))
        bank, radii = coreset.finish()
        self.memory_bank_ = bank.contiguous()
        self.coverage_radii_ = torch.from_numpy(radii)
        if self._uses_ivf():
            self.ivf_centroids_ = ivf_centroids(self.memory_bank_, self.seed)
        self._build_index()

    def _uses_ivf(self) -> bool:
        return self.search == "ivf" or (self.search == "auto" and len(self.memory_bank_) >= self.ivf_min_bank)

    def _build_index(self) -> None:
        bank = self.memory_bank_.numpy().astype(np.float32)
        if self._uses_ivf():
            # The cells are fitted state (saved), so a loaded model searches exactly the same lists.
            centroids = self.ivf_centroids_.numpy().astype(np.float32)
            quantizer = faiss.IndexFlatL2(bank.shape[1])
            quantizer.add(centroids)
            self._index = faiss.IndexIVFFlat(quantizer, bank.shape[1], len(centroids))
            self._index.is_trained = True
            self._index.add(bank)
            self._index.nprobe = int(self.nprobe)
            self._quantizer = quantizer   # the IVF index does not own it
        else:
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
        maps = upsample_blur(torch.from_numpy(patch_scores.reshape(n, h, w)), tuple(x.shape[-2:]), self.blur_sigma)
        return scores.astype(np.float32), maps.numpy().astype(np.float32)

    def _eq7_weights(self, worst_patches: np.ndarray, worst_nearest: np.ndarray) -> np.ndarray:
        """w = 1 - softmax of distances to the nearest bank patch's b neighbours, taken at that patch."""
        support = self.memory_bank_.numpy()[self._bank_neighbours[worst_nearest]]     # (n, b, c)
        dist = np.linalg.norm(support - worst_patches[:, None, :], axis=2)
        dist = np.exp(dist - dist.max(axis=1, keepdims=True))  # softmax is shift invariant; avoids overflow
        return 1.0 - dist[:, 0] / dist.sum(axis=1)

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"memory_bank": self.memory_bank_, "coverage_radii": self.coverage_radii_}
        if hasattr(self, "ivf_centroids_"):
            tensors["ivf_centroids"] = self.ivf_centroids_
        return tensors

    def _fitted_json(self) -> dict:
        return {"grid": list(self.grid_), "n_train_patches": self.n_train_patches_}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.memory_bank_ = tensors["memory_bank"]
        self.coverage_radii_ = tensors["coverage_radii"]
        self.grid_ = tuple(fitted["grid"])
        self.n_train_patches_ = fitted["n_train_patches"]
        if "ivf_centroids" in tensors:
            self.ivf_centroids_ = tensors["ivf_centroids"]
        self._build_index()

    def _card_extra(self) -> dict:
        ex = self.feature_extractor()
        return {"backbone": {"name": self.backbone, "stages": list(self.stages), "channels": list(ex.channels),
                             "strides": list(ex.strides)},
                "memory_bank": {"patches": int(self.memory_bank_.shape[0]), "dim": int(self.memory_bank_.shape[1]),
                                "from_training_patches": self.n_train_patches_,
                                "coverage_radius": float(self.coverage_radii_[-1]),
                                "search": (f"ivf, {len(self.ivf_centroids_)} cells, nprobe {self.nprobe}"
                                           if self._uses_ivf() else "exact")}}

"""A run's feature space, made visible: the PatchCore coreset, and 2-D maps of image and patch embeddings.

Patch embeddings are the detector's own (PatchCore's locally aware patches) or, for detectors without one,
the same construction on their backbone's stages, or on the default offline backbone for detectors without
a backbone (autoencoders), so every run gets a view. An image's embedding is the mean of its patches.
UMAP lays both out in 2-D; the memory bank view uses PCA, a linear map, so distances and coverage
are not distorted. Views are computed once per run and saved next to the model (:data:`VIEWS_FILE`).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..backbones import FeatureExtractor
from ..data import ImageSet, Preprocess, image_batches
from ..detectors import Detector
from ..detectors.base import Progress, no_progress
from ..detectors.patchcore import locally_aware_patches
from ..files import save_arrays

VIEWS_FILE = "feature_views.npz"
MAX_IMAGES = 400           # images embedded for the maps (a stratified sample beyond this)
MAX_PATCHES = 2500         # patches in the patch map, spread over the images
MAX_TRAIN_PATCHES = 3000   # training patches drawn behind the coreset
DEFECT_FRACTION = 0.25     # a patch counts as defective when this much of it lies in the ground truth


@dataclass(frozen=True)
class FeatureViews:
    """Tables ready to plot; x and y are 2-D coordinates."""
    images: pd.DataFrame            # x, y, path, split, defect, label, score
    patches: pd.DataFrame           # x, y, image (row in images), row, col, score, defect_patch, split, defect
    coverage_radii: np.ndarray | None   # coreset radius after each pick (PatchCore only)
    bank: pd.DataFrame | None       # x, y, kind ("training patch" or "coreset"), PatchCore only
    n_images_total: int             # images in the dataset (more than in `images` when sampled)
    grid: tuple[int, int]           # the patch grid (rows, columns) over the model's input frame


def compute_views(detector: Detector, dataset: ImageSet, progress: Progress | None = None,
                  seed: int = 0) -> FeatureViews:
    progress = progress or no_progress
    rng = np.random.default_rng(seed)
    chosen = _sample_images(dataset, MAX_IMAGES, rng)
    images = dataset[chosen]
    embed, embed_preprocess = _embedder(detector)
    per_image = max(4, MAX_PATCHES // max(len(images), 1))
    image_vectors, image_scores, patch_rows, patch_vectors, train_patches = [], [], [], [], []
    batch_size = 8
    for start, pixels in image_batches(images, batch_size):
        idx = range(start, start + len(pixels))
        emb = embed(embed_preprocess.images_to_tensor(pixels))                       # (n, C, h, w)
        scores, maps = detector.score_tensor(detector.preprocess.images_to_tensor(pixels))
        grid = emb.shape[-2:]
        patch_scores = F.adaptive_avg_pool2d(torch.from_numpy(maps)[:, None], grid)[:, 0].numpy()
        for j, i in enumerate(idx):
            vectors = emb[j].permute(1, 2, 0).reshape(-1, emb.shape[1]).numpy()
            image_vectors.append(vectors.mean(axis=0))
            image_scores.append(float(scores[j]))
            sample = images.samples[i]
            if sample.split == "train":
                train_patches.append(vectors)
            defect_patch = _defect_patches(images.mask(i), embed_preprocess, grid)
            picked = _pick_patches(patch_scores[j].ravel(), per_image, rng)
            patch_vectors.append(vectors[picked])
            for p in picked:
                patch_rows.append({"image": i, "row": int(p // grid[1]), "col": int(p % grid[1]),
                                   "score": float(patch_scores[j].ravel()[p]),
                                   "defect_patch": bool(defect_patch.ravel()[p]),
                                   "split": sample.split, "defect": sample.defect})
        progress("features", idx[-1] + 1, len(images))

    progress("layout", 0, 2)
    xy = _layout(np.stack(image_vectors), seed)
    image_table = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "path": [str(s.path) for s in images.samples],
                                "split": [s.split for s in images.samples], "defect": images.defects,
                                "label": images.labels, "score": image_scores})
    progress("layout", 1, 2)
    xy = _layout(np.concatenate(patch_vectors), seed)
    patch_table = pd.DataFrame(patch_rows).assign(x=xy[:, 0], y=xy[:, 1])
    progress("layout", 2, 2)

    radii = bank = None
    if hasattr(detector, "memory_bank_") and train_patches:
        radii = detector.coverage_radii_.numpy()
        bank = _bank_view(detector.memory_bank_.numpy(), np.concatenate(train_patches), rng)
    return FeatureViews(image_table, patch_table, radii, bank, len(dataset), tuple(int(g) for g in grid))


def save_views(views: FeatureViews, folder: str | Path) -> Path:
    arrays = {}
    for prefix, table in (("images", views.images), ("patches", views.patches), ("bank", views.bank)):
        if table is not None:
            # Text columns as fixed-width unicode: object arrays would need pickle to load.
            arrays.update({f"{prefix}.{c}": table[c].to_numpy(dtype=None if table[c].dtype.kind in "biuf" else str)
                           for c in table.columns})
    if views.coverage_radii is not None:
        arrays["coverage_radii"] = views.coverage_radii
    arrays["meta"] = np.array(json.dumps({"n_images_total": views.n_images_total, "grid": list(views.grid)}))
    return save_arrays(Path(folder) / VIEWS_FILE, **arrays)


def load_views(folder: str | Path) -> FeatureViews | None:
    path = Path(folder) / VIEWS_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        def table(prefix):
            columns = {k.split(".", 1)[1]: data[k] for k in data.files if k.startswith(prefix + ".")}
            return pd.DataFrame(columns) if columns else None
        radii = data["coverage_radii"] if "coverage_radii" in data.files else None
        meta = json.loads(str(data["meta"]))
        return FeatureViews(table("images"), table("patches"), radii, table("bank"), meta["n_images_total"],
                            tuple(meta["grid"]))


# -- helpers ---------------------------------------------------------------------------------------
def _embedder(detector: Detector):
    """(embed(x) -> (N, C, h, w), the preprocessing its inputs need)."""
    if hasattr(detector, "embed"):
        return detector.embed, detector.preprocess
    extractor = detector.feature_extractor() or FeatureExtractor()
    preprocess = Preprocess(mean=extractor.mean, std=extractor.std)
    if detector.feature_extractor() is not None:
        preprocess = detector.preprocess
    return (lambda x: locally_aware_patches(extractor(x)).float().cpu()), preprocess


def _sample_images(dataset: ImageSet, limit: int, rng: np.random.Generator) -> np.ndarray:
    """All indices, or `limit` of them drawn evenly from every (split, defect) group."""
    n = len(dataset)
    if n <= limit:
        return np.arange(n)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        groups.setdefault((s.split, s.defect), []).append(i)
    share = limit / n
    chosen = [rng.choice(ix, max(1, round(len(ix) * share)), replace=False) for ix in groups.values()]
    return np.sort(np.concatenate(chosen))


def _pick_patches(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The k/4 highest-scoring patches (where defects are) and a random draw of the rest."""
    k = min(k, scores.size)
    top = np.argsort(scores)[::-1][: k // 4]
    rest = np.setdiff1d(np.arange(scores.size), top)
    return np.concatenate([top, rng.choice(rest, k - top.size, replace=False)])


def _defect_patches(mask: np.ndarray | None, preprocess: Preprocess, grid) -> np.ndarray:
    if mask is None or not mask.any():
        return np.zeros(tuple(grid), dtype=bool)
    frame = torch.from_numpy(preprocess.mask_to_frame(mask).astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(frame, tuple(grid))[0, 0].numpy() >= DEFECT_FRACTION


def _layout(vectors: np.ndarray, seed: int) -> np.ndarray:
    """UMAP to 2-D; PCA for sets too small for a neighbourhood graph."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) < 8:
        return _pca(vectors)
    import umap   # slow to import (numba): only when a view is computed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # umap warns that a fixed random_state disables parallelism
        reducer = umap.UMAP(n_neighbors=min(15, len(vectors) - 1), min_dist=0.1, random_state=seed, n_jobs=1)
        return reducer.fit_transform(vectors)


def _pca(vectors: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
    """2-D PCA of vectors, with axes fitted on `basis` (default: the vectors themselves)."""
    basis = np.asarray(vectors if basis is None else basis, dtype=np.float64)
    mean = basis.mean(axis=0)
    centred = basis - mean
    # Eigenvectors of the small D x D covariance: an SVD of the N x D data is far slower for N >> D.
    _, eigenvectors = np.linalg.eigh(centred.T @ centred)
    axes = eigenvectors[:, ::-1][:, :2]
    out = (np.asarray(vectors, dtype=np.float64) - mean) @ axes
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))) if out.shape[1] < 2 else out


def _bank_view(bank: np.ndarray, train_patches: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Training patches (a sample) and the coreset, in one PCA plane fitted on the training patches."""
    drawn = train_patches[rng.choice(len(train_patches), min(MAX_TRAIN_PATCHES, len(train_patches)), replace=False)]
    xy_train = _pca(drawn)
    xy_bank = _pca(bank, basis=drawn)
    return pd.DataFrame({"x": np.r_[xy_train[:, 0], xy_bank[:, 0]], "y": np.r_[xy_train[:, 1], xy_bank[:, 1]],
                         "kind": ["training patch"] * len(drawn) + ["coreset"] * len(bank)})


def patch_box(views: FeatureViews, row: int, col: int, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of one patch's cell in the model frame, for outlining it."""
    (h, w), (rows, cols) = size_hw, views.grid
    box = np.zeros((h, w), dtype=bool)
    box[row * h // rows:(row + 1) * h // rows, col * w // cols:(col + 1) * w // cols] = True
    return box

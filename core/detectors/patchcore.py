"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two mid-level backbone stages, a greedy coreset memory bank, and
nearest-neighbour distances as anomaly scores; follows the paper and amazon-science/patchcore-inspection.
"""
from __future__ import annotations

import time
from typing import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import DEFAULT_BACKBONE
from ..data import Preprocess, image_batches
from . import auto_settings
from .base import BackboneDetector, Progress, native_long_side, register_detector, store_params
from .coreset import StreamingCoreset, greedy_coreset
from .ops import upsample_blur

# The candidates resize="auto" and coreset_ratio="auto" choose from: longer sides up to the images' own,
# and memory banks as shares of the fitting patches (AUTO_TUNE_PATCHES of them: 1% to 10%).
AUTO_LONG_SIDES = (256, 384, 512)
AUTO_BANKS = (1000, 2500, 5000, 10000)
# score_border="auto" candidates, in patch cells (stride 8 at the default stages: 0 to 24 px).
AUTO_BORDER_CELLS = (0, 1, 2, 3)
# The candidates' banks are picked from at most this many patches of at most this many images.
AUTO_TUNE_PATCHES, AUTO_TUNE_IMAGES = 100_000, 100
# coreset_ratio="auto" on a set too small to hold images out.
SMALL_SET_RATIO = 0.1
# nprobe="auto": candidates, the training patches it is judged on, and the share of them allowed a neighbour more
# than 1% farther than the exact one.
AUTO_NPROBE, NPROBE_SAMPLE, NPROBE_TOLERANCE = (1, 2, 4, 8, 16, 32, 64), 5000, 0.05
# Patches per image re-searched exactly per round when the index is approximate (see _exact_where_it_counts).
EXACT_RECHECK = 16
# Bank patches per matrix product in the torch search (score_graph): 2304 patches x 4096 is 38 MB of distances.
SEARCH_CHUNK = 4096


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


def _inner(patch_scores: np.ndarray, border: int) -> np.ndarray:
    """Patch scores (N, h, w) with `border` cells at each edge set to 0, so that they never give the image score;
    unchanged where the border would leave no inner cell."""
    if border <= 0 or 2 * border >= min(patch_scores.shape[-2:]):
        return patch_scores
    out = np.zeros_like(patch_scores)
    out[:, border:-border, border:-border] = patch_scores[:, border:-border, border:-border]
    return out


def ivf_centroids(bank: torch.Tensor, seed: int) -> torch.Tensor:
    """k-means cells for an IVF index over the bank: 4 sqrt(N) of them, the low end of faiss's advice."""
    x = bank.numpy().astype(np.float32)
    n_cells = int(min(len(x) // 39, 4 * np.sqrt(len(x))))   # faiss wants >= 39 training points per cell
    kmeans = faiss.Kmeans(x.shape[1], max(1, n_cells), niter=20, seed=int(seed) + 1)
    kmeans.train(x)
    return torch.from_numpy(kmeans.centroids.copy())


@register_detector("patchcore", family="representation", summary=(
                   "Remembers a compact bank of good image patches and flags patches far from all of them; the "
                   "strongest here in general, trains in seconds to minutes."))
class PatchCore(BackboneDetector):
    """PatchCore anomaly detector.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
    resize : input size. "auto" (default): the training images' aspect ratio kept, the longer side 256, 384 or
        512 px (up to the images' own median), whichever best separates held-out good images from synthetic
        defects (a 1260 x 500 part at 512 -> 512 x 192). An int sets the longer side (aspect kept); (h, w)
        sets the frame.
    crop : centre crop after resizing (the paper: 224 of 256); None (default) keeps the whole image, so a
        defect at the border is scored.
    coreset_ratio : fraction of training patches kept in the memory bank (paper: 0.01 to 0.1; it reports 1%
        within 0.1 image AUROC points of 10% on MVTec), or "auto" (default): the smallest share, 1% to 10%,
        beyond which a bigger bank no longer makes held-out good images look more normal.
    min_bank : the bank keeps at least this many patches (or all of them), whatever the ratio: 1% of a
        25-image set would leave a few hundred patches to describe every normal variation.
    projection_dim : random projection width used only for coreset selection.
    search : nearest-neighbour index. "exact" (faiss flat L2), "ivf" (inverted lists over k-means cells of
        the bank, `nprobe` cells searched per patch), or "auto" (default): exact below `ivf_min_bank`
        patches, IVF above. With the exact re-check of each image's worst patches IVF changes no image score; the
        default threshold is the smallest default bank (measured: bottle 224 px with a 14,739-patch bank predicts
        in 1.74x the backbone against 3.94x exact, metrics within 0.0001).
    nprobe : IVF cells searched per patch (an int >= 1): more is slower and closer to the exact search; or "auto"
        (default): the fewest cells (1 to 64) with which at most 5% of a sample of training patches get a
        neighbour more than 1% farther than the exact one. Each image's score is searched exactly either way
        (its worst patches are re-checked), so nprobe only trades the map's fidelity for speed.
    ivf_min_bank : the smallest bank, in patches, that "auto" searches with IVF.
    score_border : pixels at the edge of the model frame left out of the image score (the map keeps them),
        for images whose edges vary from one good part to the next (a fixture, a cut edge), or "auto"
        (default): chosen with the other "auto" settings, 0 unless held-out good images score highest at
        their edges by more than the synthetic defects there would be missed.
    reweight : apply the paper's Eq. 7 to the image score, using `n_reweight` bank neighbours.
    n_reweight : bank neighbours the reweighting looks at (an int >= 1; the paper: 9).
    blur_sigma : Gaussian blur of the upsampled anomaly map (paper: 4).

    With resize, coreset_ratio and score_border at "auto" (the defaults) the fit first chooses them from the
    training images: a share of them is held out and synthetic defects are pasted into those; each candidate
    longer side (256, 384, 512 px, up to the images' own) and score border (0 to 24 px) is judged by how well
    it separates the held-out good images from their defective copies (the cheapest wins unless a dearer one
    is better by more than the noise), and the bank (1% to 10% of the patches) by when a bigger one stops making the held-out good images
    look more normal. The final model is then fitted on every image; `fit_info_["auto_settings"]` records
    the candidates, their scores and the choice. Sets under 10 images keep their own size, a 10% bank and
    the whole image. Setting a parameter takes it out of the choice.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (2, 3), weights: str | None = None,
                 resize: int | str | tuple = "auto", crop: int | None = None, coreset_ratio: float | str = "auto",
                 min_bank: int = 2000, projection_dim: int = 128, search: str = "auto", nprobe: int | str = "auto",
                 ivf_min_bank: int = 2000, score_border: int | str = "auto", reweight: bool = True, n_reweight: int = 9,
                 blur_sigma: float = 4.0, calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        if self.coreset_ratio != "auto" and not (isinstance(self.coreset_ratio, (int, float)) and
                                                  0 < self.coreset_ratio <= 1):
            raise ValueError(f"coreset_ratio must be 'auto' or a fraction between 0 and 1 (e.g. 0.05 for 5% of the "
                             f"training patches), not {self.coreset_ratio!r}")
        self._require_stages()
        self._require_positive("n_reweight", "min_bank", "ivf_min_bank")
        if self.nprobe != "auto" and not (isinstance(self.nprobe, int) and not isinstance(self.nprobe, bool)
                                          and self.nprobe >= 1):
            raise ValueError(f"nprobe must be 'auto' or a number of IVF cells >= 1, not {self.nprobe!r}")
        if self.score_border != "auto" and not (isinstance(self.score_border, int) and 0 <= self.score_border
                                                 and not isinstance(self.score_border, bool)):
            raise ValueError(f"score_border must be 'auto' or a number of pixels >= 0, not {self.score_border!r}")
        if self.search not in ("auto", "exact", "ivf"):
            raise ValueError(f"search must be 'auto', 'exact' or 'ivf', not {self.search!r}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) locally aware patch embeddings of a preprocessed batch."""
        return locally_aware_patches(self.backbone_features(x)).float().cpu()

    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        coreset, sample = None, []
        rng = np.random.default_rng(self.seed)
        for start, batch in image_batches(images, batch_size):
            emb = self.embed(self.preprocess.images_to_tensor(batch))
            rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            # An even share of every batch's patches: the queries nprobe="auto" is judged on.
            take = min(len(rows), -(-NPROBE_SAMPLE * len(batch) // len(images)))
            sample.append(rows[torch.from_numpy(rng.choice(len(rows), take, replace=False))])
            if coreset is None:
                # Every image has the model's frame, so the patch count is known from the first batch.
                self.grid_ = tuple(emb.shape[-2:])
                self.n_train_patches_ = len(images) * self.grid_[0] * self.grid_[1]
                ratio = self.auto_settings_["coreset_ratio"] if self.coreset_ratio == "auto" else self.coreset_ratio
                n_select = max(round(ratio * self.n_train_patches_), int(self.min_bank))
                coreset = StreamingCoreset(self.n_train_patches_, n_select, self.projection_dim, self.seed, progress)
            coreset.add(rows)
            progress("features", start + len(batch), len(images))
        self.score_border_px_ = int(self.auto_settings_["score_border"] if self.score_border == "auto"
                                    else self.score_border)
        bank, radii = coreset.finish()
        self.memory_bank_ = bank.contiguous()
        self.coverage_radii_ = torch.from_numpy(radii)
        self.nprobe_ = None if self.nprobe == "auto" else int(self.nprobe)
        self.nprobe_choice_ = None
        if self._uses_ivf():
            self.ivf_centroids_ = ivf_centroids(self.memory_bank_, self.seed)
        self._build_index(np.ascontiguousarray(torch.cat(sample).numpy()))

    def _choose_nprobe(self, queries: np.ndarray) -> int:
        """The fewest IVF cells per patch with which at most NPROBE_TOLERANCE of `queries` get a neighbour more
        than 1% farther than the exact one (measured: bottle takes 4 cells, magnetic tile 16)."""
        true = np.sqrt(np.maximum(self._exact_index.search(queries, 1)[0][:, 0], 0))
        queries, true = queries[true > 1e-3], true[true > 1e-3]    # bank patches themselves tell nothing
        rows = []
        for nprobe in AUTO_NPROBE:
            self._index.nprobe = nprobe
            found = np.sqrt(np.maximum(self._index.search(queries, 1)[0][:, 0], 0))
            rows.append({"nprobe": nprobe, "share_over_1pct": round(float(np.mean(found > 1.01 * true)), 4)})
            if rows[-1]["share_over_1pct"] <= NPROBE_TOLERANCE:
                break
        self.nprobe_choice_ = {"candidates": rows, "queries": int(len(queries)),
                               "why": f"{rows[-1]['share_over_1pct']:.1%} of {len(queries)} training patches got "
                                      f"a neighbour over 1% farther than the exact one with {rows[-1]['nprobe']} "
                                      f"of {len(self.ivf_centroids_)} cells (at most {NPROBE_TOLERANCE:.0%} asked)"}
        return rows[-1]["nprobe"]

    def _auto_settings(self, images: Sequence[np.ndarray], sizes_hw, progress: Progress) -> dict:
        tune = {"size": self.resize == "auto", "bank": self.coreset_ratio == "auto",
                "border": self.score_border == "auto"}
        if not any(tune.values()):
            return {}
        native = native_long_side(sizes_hw)
        if len(images) < auto_settings.MIN_IMAGES:
            return {"long_side": native, "coreset_ratio": SMALL_SET_RATIO, "score_border": 0,
                    "why": f"{len(images)} training images are too few to hold any out: the images' own size "
                           f"({native} px), {SMALL_SET_RATIO:.0%} of the patches (at least {self.min_bank}) "
                           "and the whole image scored"}
        start = time.perf_counter()
        held = auto_settings.hold_out(images, self.seed)
        rng = np.random.default_rng(self.seed)
        fit_index = held.train_index
        if len(fit_index) > AUTO_TUNE_IMAGES:
            fit_index = np.sort(rng.choice(fit_index, AUTO_TUNE_IMAGES, replace=False))
        long_sides = [None]
        if tune["size"]:
            long_sides = [s for s in AUTO_LONG_SIDES if s <= native]   # native is at least 256
            long_sides = sorted(set(long_sides + [native]))
        rows = []
        for step, long_side in enumerate(long_sides):
            frame = self._fit_frame(sizes_hw, long_side)
            # Each batch re-reports this candidate's step: a cancel lands within a batch, not after a candidate.
            rows += self._compare_at(frame, images, fit_index, held, rng, tune,
                                     lambda: progress("auto settings", step, len(long_sides)))
            progress("auto settings", step + 1, len(long_sides))
        # The frame and the score border by separation (each frame at its best, then the cheapest near the best
        # of those; the border judged at the largest bank), the bank by the held-out good images' scores
        # levelling off: synthetic defects tell settings apart, good images tell when the bank covers them.
        frame = auto_settings.best_frame(rows)
        at_frame = [r for r in rows if r["frame"] == frame]
        # The border changes image scores only (the map keeps it), so image AUROC judges it.
        border = auto_settings.cheapest_within([r for r in at_frame if r["bank"] == at_frame[-1]["bank"]],
                                               key="image_auroc")["border_px"]
        chosen = auto_settings.levelled_off([r for r in at_frame if r["border_px"] == border])
        for row in rows:   # the bootstrap values served the choice; the record keeps the summary
            row["se"] = round(float(np.nanstd(row.pop("bootstrap")["separation"])), 4)
        settings = {"seconds": round(time.perf_counter() - start, 1), "candidates": rows, "n_held_out": int(len(held.held_out_index)),
                    "n_synthetic_defects": int(held.labels.sum()), "n_fitted_on": int(len(fit_index)),
                    "tolerance": auto_settings.TOLERANCE}
        why = []
        if tune["size"]:
            settings["long_side"] = max(frame)
            why.append(f"input {frame[0]} x {frame[1]} px (H x W)")
        if tune["bank"]:
            # The bank is chosen as a share of the fitting images' patches and keeps that share on every image.
            settings["coreset_ratio"] = round(chosen["bank"] / chosen["from_patches"], 4)
            why.append(f"a bank of {settings['coreset_ratio']:.1%} of the patches (good images' scores level off "
                       f"there)")
        if tune["border"]:
            settings["score_border"] = chosen["border_px"]
            why.append(f"the outer {chosen['border_px']} px left out of the image score" if chosen["border_px"]
                       else "the whole image scored")
        settings["why"] = (f"{', '.join(why)}; chosen on {len(held.held_out_index)} held-out good images and "
                           f"{int(held.labels.sum())} synthetic defects, which they separate by "
                           f"{chosen['separation']:.3f} (best candidate {max(r['separation'] for r in rows):.3f}; "
                           f"a cheaper setting wins unless a dearer one is better by more than the noise)")
        return settings

    def fold_params(self) -> dict:
        return {**super().fold_params(), "score_border": self.score_border_px_,
                "coreset_ratio": self.auto_settings_.get("coreset_ratio", self.coreset_ratio)}

    def _compare_at(self, frame, images, fit_index, held, rng, tune: dict, checkpoint) -> list[dict]:
        """Separation of every candidate bank size and score border at this frame: one greedy run on patches
        of the fitting images (its prefixes are the smaller banks), the held-out images searched once per
        increment of the bank."""
        extractor = self.feature_extractor()
        pre = Preprocess(resize=frame, crop=self.crop, mean=extractor.mean, std=extractor.std)
        per_image = max(1, AUTO_TUNE_PATCHES // len(fit_index))
        rows = []
        for start in range(0, len(fit_index), 16):
            checkpoint()
            emb = self.embed(pre.images_to_tensor([images[int(i)] for i in fit_index[start:start + 16]]))
            for e in emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1]):
                # An even share of every image's patches keeps the rarer images represented.
                rows.append(e if len(e) <= per_image else e[torch.from_numpy(rng.choice(len(e), per_image, replace=False))])
        patches = torch.cat(rows)
        if tune["bank"]:
            banks = sorted({min(b, len(patches)) for b in AUTO_BANKS})
        else:
            banks = [min(len(patches), max(round(self.coreset_ratio * len(patches)), int(self.min_bank)))]
        order, _ = greedy_coreset(patches, banks[-1], self.projection_dim, self.seed)
        queries = torch.cat([self.embed(pre.images_to_tensor(held.images[i:i + 16]))
                             for i in range(0, len(held.images), 16)])
        n, c, gh, gw = queries.shape
        stride = extractor.strides[0]
        borders = AUTO_BORDER_CELLS if tune["border"] else [round(self.score_border / stride)]
        borders = [b for b in borders if 2 * b < min(gh, gw)]
        q = np.ascontiguousarray(queries.permute(0, 2, 3, 1).reshape(-1, c).numpy())
        coverage = auto_settings.grid_masks(held.masks, pre.mask_to_frame, (gh, gw))
        nearest = np.full(len(q), np.inf, dtype=np.float32)
        out, done = [], 0
        for bank in banks:   # nested prefixes: each larger bank only adds its new patches to the search
            checkpoint()
            index = faiss.IndexFlatL2(c)
            index.add(np.ascontiguousarray(patches[torch.from_numpy(order[done:bank])].numpy()))
            nearest = np.minimum(nearest, index.search(q, 1)[0][:, 0])
            done = bank
            scores = np.sqrt(np.maximum(nearest, 0)).reshape(n, gh, gw)
            for border in borders:
                out.append({"frame": list(frame), "bank": int(bank), "from_patches": len(patches),
                            "border_px": int(border * stride),
                            **auto_settings.separation_with_error(
                                held.labels, held.groups, _inner(scores, border).reshape(n, -1).max(axis=1),
                                scores, coverage)})
        return out

    def _uses_ivf(self) -> bool:
        return self.search == "ivf" or (self.search == "auto" and len(self.memory_bank_) >= self.ivf_min_bank)

    def _build_index(self, nprobe_queries: np.ndarray | None = None) -> None:
        """The search index over the bank; a fit whose nprobe is "auto" passes the training patches that choose it."""
        bank = self.memory_bank_.numpy().astype(np.float32)
        if self._uses_ivf():
            # The cells are fitted state (saved), so a loaded model searches exactly the same lists.
            centroids = self.ivf_centroids_.numpy().astype(np.float32)
            quantizer = faiss.IndexFlatL2(bank.shape[1])
            quantizer.add(centroids)
            self._index = faiss.IndexIVFFlat(quantizer, bank.shape[1], len(centroids))
            self._index.is_trained = True
            self._index.add(bank)
            self._quantizer = quantizer   # the IVF index does not own it
            self._exact_index = faiss.IndexFlatL2(bank.shape[1])   # re-checks the worst patches exactly
            self._exact_index.add(bank)
            if self.nprobe_ is None:
                self.nprobe_ = self._choose_nprobe(nprobe_queries)
            self._index.nprobe = int(self.nprobe_)
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
        queries = np.ascontiguousarray(emb.permute(0, 2, 3, 1).reshape(-1, c).numpy())
        sq_dist, nearest = self._index.search(queries, 1)
        # IndexFlatL2 returns squared distances.
        patch_scores = np.sqrt(np.maximum(sq_dist[:, 0], 0)).reshape(n, h * w)
        nearest = nearest[:, 0].reshape(n, h * w)
        border = round(self.score_border_px_ / self.feature_extractor().strides[0])
        inner = _inner(np.ones((1, h, w), np.float32), border).reshape(h * w) > 0
        if self._uses_ivf():
            self._exact_where_it_counts(queries.reshape(n, h * w, c), patch_scores, nearest, inner)
        worst = np.where(inner, patch_scores, 0).argmax(axis=1)
        rows = np.arange(n)
        scores = patch_scores[rows, worst]
        if self.reweight:
            scores = scores * self._eq7_weights(queries.reshape(n, h * w, c)[rows, worst], nearest[rows, worst])
        maps = upsample_blur(torch.from_numpy(patch_scores.reshape(n, h, w)), tuple(x.shape[-2:]), self.blur_sigma)
        return scores.astype(np.float32), maps.numpy().astype(np.float32)

    def _exact_where_it_counts(self, queries: np.ndarray, patch_scores: np.ndarray, nearest: np.ndarray,
                               inner: np.ndarray) -> None:
        """Make each image's worst inner patch exactly what the exact search gives, in place.

        An approximate index never finds a neighbour closer than the true one, so every approximate score is an
        upper bound of the exact one. Each image's patches are re-searched exactly from the highest approximate
        score down, until the next approximate score is below the highest exact score found: no patch left can
        then beat it. The image score's patch, its distance and its nearest bank patch are the exact search's (Eq. 7
        then weighs by that bank patch's neighbours as the index found them); the rest of the map keeps the
        index's scores.
        """
        n = len(queries)
        order = np.argsort(-np.where(inner, patch_scores, -1), axis=1, kind="stable")
        best = np.zeros(n, dtype=np.float32)
        done = np.zeros(n, dtype=np.int64)
        pending = np.arange(n)
        while len(pending):
            step = np.minimum(EXACT_RECHECK, inner.sum() - done[pending])
            cells = [order[i, done[i]:done[i] + k] for i, k in zip(pending, step)]
            sq, idx = self._exact_index.search(np.concatenate([queries[i, cell] for i, cell in zip(pending, cells)]), 1)
            exact = np.sqrt(np.maximum(sq[:, 0], 0))
            at = 0
            for i, cell in zip(pending, cells):
                patch_scores[i, cell] = exact[at:at + len(cell)]
                nearest[i, cell] = idx[at:at + len(cell), 0]
                best[i] = max(best[i], exact[at:at + len(cell)].max(initial=0))
                done[i] += len(cell)
                at += len(cell)
            pending = np.array([i for i in pending
                                if done[i] < inner.sum() and patch_scores[i, order[i, done[i]]] > best[i]], dtype=np.int64)

    def score_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_score_batch` in torch operations, with an exact search written as matrix products over the bank in
        chunks (what an exported graph runs; on a model that searches an IVF index the two differ by the
        index's recall)."""
        emb = locally_aware_patches(self.backbone_features(x)).float().cpu()
        n, c, h, w = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(n, h * w, c)
        bank = self.memory_bank_.float()
        bank_sq = bank.pow(2).sum(1)
        query_sq = queries.pow(2).sum(2, keepdim=True)
        best, nearest = [], []
        for start in range(0, len(bank), SEARCH_CHUNK):   # bounds the (patches x chunk) distance matrix
            chunk = slice(start, start + SEARCH_CHUNK)
            sq = query_sq - 2 * queries @ bank[chunk].T + bank_sq[chunk]
            value, index = sq.min(dim=2)
            best.append(value)
            nearest.append(index + start)
        sq_dist, which = torch.stack(best).min(dim=0)                        # (n, h w)
        nearest = torch.stack(nearest).gather(0, which[None])[0]
        patch_scores = sq_dist.clamp_min(0).sqrt()
        border = round(self.score_border_px_ / self.feature_extractor().strides[0])
        inner = torch.from_numpy(_inner(np.ones((1, h, w), np.float32), border)).reshape(1, h * w)
        worst = (patch_scores * inner).argmax(dim=1)
        rows = torch.arange(n)
        scores = patch_scores[rows, worst]
        if self.reweight:
            support = bank[torch.from_numpy(self._bank_neighbours)[nearest[rows, worst]]]     # (n, b, c)
            dist = (support - queries[rows, worst][:, None, :]).pow(2).sum(2).sqrt()
            scores = scores * (1.0 - torch.softmax(dist, dim=1)[:, 0])
        maps = upsample_blur(patch_scores.reshape(n, h, w), tuple(x.shape[-2:]), self.blur_sigma)
        return scores, maps

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
        return {"grid": list(self.grid_), "n_train_patches": self.n_train_patches_,
                "score_border_px": self.score_border_px_, "nprobe": self.nprobe_,
                "nprobe_choice": self.nprobe_choice_}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.memory_bank_ = tensors["memory_bank"]
        self.coverage_radii_ = tensors["coverage_radii"]
        self.grid_ = tuple(fitted["grid"])
        self.n_train_patches_ = fitted["n_train_patches"]
        self.score_border_px_ = int(fitted.get("score_border_px", 0))   # models saved before it score every cell
        if "ivf_centroids" in tensors:
            self.ivf_centroids_ = tensors["ivf_centroids"]
        # Models saved before nprobe="auto" searched the cells their parameter said.
        self.nprobe_ = fitted.get("nprobe", None if self.nprobe == "auto" else int(self.nprobe))
        self.nprobe_choice_ = fitted.get("nprobe_choice")
        self._build_index()

    def _card_extra(self) -> dict:
        return {"score_border_px": self.score_border_px_,
                "memory_bank": {"patches": int(self.memory_bank_.shape[0]), "dim": int(self.memory_bank_.shape[1]),
                                "from_training_patches": self.n_train_patches_,
                                "coverage_radius": float(self.coverage_radii_[-1]),
                                "search": (f"ivf, {len(self.ivf_centroids_)} cells, nprobe {self.nprobe_}"
                                           + (f" ({self.nprobe_choice_['why']})" if self.nprobe_choice_ else "")
                                           + "; image scores re-checked exactly"
                                           if self._uses_ivf() else "exact")}}

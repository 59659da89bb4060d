"""CPR (Li et al., "Target before Shooting: Accurate Anomaly Detection and Localization under One Millisecond
via Cascade Patch Retrieval", TIP 2024; reference code flyinghu123/CPR).

PatchCore compares each test patch with every training patch; CPR first narrows the search twice:

1. Global retrieval: every image is described by histograms of visual words (k-means over its finest
   features) in a grid of blocks; a test image retrieves the K training images whose block histograms are
   closest (KL divergence, summed over the best-matching share of the blocks, so a defect's blocks do not
   spoil the match).
2. Local retrieval: each test patch is compared only with the patches of those K images within a small
   window around its own position (aligned regions), by cosine distance, per backbone stage; the stages'
   distance maps are upsampled, summed and blurred.
3. Foreground weighting (optional): a linear classifier of background against object features, trained on
   the training images' border and centre (the paper's unsupervised estimate), scales the map so that a
   busy background cannot raise the score.

The image score is the mean of the highest `top_share` of the map (the paper sums the top 512 of 320 x 320
pixels, 0.5%): a defect of a few pixels counts, one hot pixel does not.

Not built: the paper's learned local-retrieval head (trained on synthetic defects over DTD textures, which
cannot be downloaded here) and its DenseNet201 backbone (no weights offline). Raw, L2-normalised
EfficientNet-Lite features stand in for both; the model card says so.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from ..backbones import DEFAULT_BACKBONE
from ..data import image_batches
from . import auto_settings
from .base import BackboneDetector, Progress, register_detector, store_params
from .ops import upsample_blur

# Global retrieval: words fitted on at most this many finest-stage patches.
WORD_SAMPLE = 50_000
# Foreground estimate (the paper's values): the border band taken as background and the centre square taken
# as object, as shares of the grid; the classifier's output is clipped to [0, 1] between its 1st and 99th
# percentiles on the training patches.
BACKGROUND_BAND, OBJECT_HALF_SIDE, FOREGROUND_SAMPLE = 3 / 80, 1 / 5, 15_000
# Automatic settings: candidate longer sides (up to the images' own; the smallest that keeps the images' detail
# wins), and (K, finest window) pairs from cheapest to dearest, coarser stages' windows halved (odd). Boards of
# many layouts need many retrieved images and wide windows, aligned products few and narrow ones: held-out
# images tell which (CPR._choose_search).
AUTO_MAX_SIDE, AUTO_SIDES = 640, (384, 512)
AUTO_SEARCH = ((10, 3), (20, 5), (30, 9), (60, 9), (60, 15))
AUTO_HELD_OUT = 12
# Local retrieval: a padded window position never wins (similarity -FAR); query patches per matrix product;
# windows up to SHIFT_MAX_WINDOW are searched offset by offset instead (faster there, measured).
FAR, TILE, SHIFT_MAX_WINDOW = 4.0, 8, 5


def block_histograms(words: torch.Tensor, n_words: int, blocks: int) -> torch.Tensor:
    """(N, blocks^2, n_words) share of each visual word in each of blocks x blocks cells of word maps (N, h, w)."""
    n, h, w = words.shape
    rows = torch.div(torch.arange(h) * blocks, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w) * blocks, w, rounding_mode="floor")
    cell = (rows[:, None] * blocks + cols[None, :]).flatten()                    # (h w,) block of each position
    index = cell[None, :] * n_words + words.flatten(1)                            # (N, h w)
    counts = torch.zeros(n, blocks * blocks * n_words).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float))
    counts = counts.view(n, blocks * blocks, n_words)
    return counts / counts.sum(-1, keepdim=True)


def window_min_distance(query: torch.Tensor, refs: torch.Tensor, window: int) -> torch.Tensor:
    """(h, w) smallest cosine distance from each query patch (C, h, w; unit norm) to the patches of the
    reference maps (K, C, h, w; unit norm) within a window x window neighbourhood of the same position.

    Tiled: each TILE x TILE block of query patches is one matrix product with every reference patch that any
    of its windows reaches, masked to each patch's own window. Ten times faster than a loop over the window's
    shifts at window 9, since the products run as dense GEMMs instead of elementwise passes over memory."""
    r = window // 2
    if r == 0:
        return 1 - (query[None] * refs).sum(1).amax(0)
    if window <= SHIFT_MAX_WINDOW:
        return _shifted_min_distance(query, refs, r)
    k, c, h, w = refs.shape
    ph, pw = -(-h // TILE) * TILE, -(-w // TILE) * TILE                         # padded to whole tiles
    padded = F.pad(refs, (r, r + pw - w, r, r + ph - h))
    valid = F.pad(torch.ones(h, w, dtype=torch.bool), (r, r + pw - w, r, r + ph - h))
    query = F.pad(query, (0, pw - w, 0, ph - h))
    span = TILE + 2 * r
    cell, reach = torch.arange(TILE), torch.arange(span)
    near = (reach[None, :] >= cell[:, None]) & (reach[None, :] <= cell[:, None] + 2 * r)     # (TILE, span)
    inside = (near[:, None, :, None] & near[None, :, None, :]).reshape(TILE * TILE, span * span)
    best = torch.empty(ph, pw, dtype=refs.dtype)
    for y in range(0, ph, TILE):
        for x in range(0, pw, TILE):
            q = query[:, y:y + TILE, x:x + TILE].reshape(c, -1).T                            # (TILE², C)
            sim = torch.matmul(q, padded[:, :, y:y + span, x:x + span].reshape(k, c, -1)).amax(0)
            allowed = inside & valid[y:y + span, x:x + span].reshape(1, -1)
            best[y:y + TILE, x:x + TILE] = (1 - sim.masked_fill(~allowed, -FAR).amax(1)).view(TILE, TILE)
    return best[:h, :w]


def _shifted_min_distance(query: torch.Tensor, refs: torch.Tensor, r: int) -> torch.Tensor:
    """window_min_distance by a loop over the window's (2r + 1)^2 offsets, channels last: each offset is one
    elementwise pass over the overlapping region only (no padding to mask). Four times faster than the tiles
    at window 3, where a tile's product is mostly wasted on positions outside every window."""
    k, c, h, w = refs.shape
    refs_last = refs.permute(0, 2, 3, 1).contiguous()                          # (K, h, w, C)
    q = query.permute(1, 2, 0).contiguous()                                    # (h, w, C)
    best = torch.full((h, w), -FAR, dtype=refs.dtype)
    for oy in range(-r, r + 1):
        for ox in range(-r, r + 1):
            ys, ye, xs, xe = max(0, -oy), min(h, h - oy), max(0, -ox), min(w, w - ox)
            sim = (refs_last[:, ys + oy:ye + oy, xs + ox:xe + ox] * q[ys:ye, xs:xe]).sum(-1).amax(0)
            region = best[ys:ye, xs:xe]
            torch.maximum(region, sim, out=region)
    return 1 - best


@register_detector("cpr", family="representation", summary=(
                   "Finds the most similar good training images, then compares each patch with patches near "
                   "the same place in them; strong on aligned parts."))
class CPR(BackboneDetector):
    """CPR anomaly detector: global retrieval of similar training images, then local patch retrieval.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
        Default: EfficientNet-Lite0 stages 1 and 2 (strides 4 and 8, as the paper's scales 4 and 8).
    resize : the longer side of the input with the aspect ratio kept, "auto" (default: the smallest of 384 px,
        512 px and the images' own median longer side up to 640 that keeps the images' detail) or (h, w) for an
        exact frame.
    crop : centre crop after resizing; None (default) keeps the whole image.
    n_neighbours : K, training images retrieved per test image (paper: 10), or "auto" (default).
    windows : local retrieval window side, per stage, in cells (paper: 3 at stride 4, 1 at stride 8), or "auto"
        (default).

    With K or the windows "auto", the fitted model scores up to 12 held-out good training images and synthetic
    defects pasted into them under each candidate (K, windows), each image's own entry left out of the
    retrieval: the cheapest candidate whose separation is within the noise of the best wins
    (`fit_info_["auto_settings"]` records the candidates, and the frame's detail losses).
    n_words, blocks, block_share : global retrieval's visual words (paper: 12), blocks per side (5) and the
        share of best-matching blocks that decide (4/5).
    foreground : weight the map by an estimate of the object (True), or not (False, default).
    blur_sigma : Gaussian blur of the summed, upsampled distance map (paper: 4).
    top_share : the image score is the mean of this highest share of the map's pixels.

    Attributes
    ----------
    n_neighbours_, windows_ : the K and windows in use (chosen or given).
    banks_ : per stage, (N, C, h, w) float16 unit-norm features of the training images.
    words_ : (n_words, C) visual words over the finest stage.
    histograms_ : (N, blocks^2, n_words) block histograms of the training images.
    foreground_ : (C + 1,) weights and bias of the foreground classifier, scaled to [0, 1] (None without).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2), weights: str | None = None,
                 resize: int | str | tuple = "auto", crop: int | None = None,
                 n_neighbours: int | str = "auto", windows: tuple | str = "auto", n_words: int = 12, blocks: int = 5, block_share: float = 0.8,
                 foreground: bool = False, blur_sigma: float = 4.0, top_share: float = 0.005,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        self._require_stages()
        self._require_positive("n_words", "blocks")
        if self.n_neighbours != "auto" and not (isinstance(self.n_neighbours, int) and self.n_neighbours >= 1):
            raise ValueError(f"n_neighbours must be 'auto' or an int >= 1, got {self.n_neighbours!r}")
        if self.windows != "auto" and (len(self.windows) != len(self.stages) or not all(
                isinstance(w, int) and w >= 1 and w % 2 == 1 for w in self.windows)):
            raise ValueError(f"windows needs one odd window side >= 1 per stage ({len(self.stages)}), "
                             f"got {self.windows!r}")
        if not 0 < self.block_share <= 1:
            raise ValueError(f"block_share must be in (0, 1], got {self.block_share!r}")
        if not 0 < self.top_share <= 1:
            raise ValueError(f"top_share must be in (0, 1], got {self.top_share!r}")

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-norm stage maps of a preprocessed batch, on the CPU."""
        return [F.normalize(f.float(), dim=1).cpu() for f in self.backbone_features(x)]

    # --- fit ----------------------------------------------------------------------------------------
    def _search_candidates(self) -> list[tuple[int, tuple[int, ...]]]:
        """(K, windows) pairs to choose from, cheapest first; a parameter not at "auto" stays as given."""
        def windows(finest: int) -> tuple[int, ...]:
            return tuple(max(1, (finest >> i) | 1) for i in range(len(self.stages)))   # halved per stage, odd
        if self.n_neighbours != "auto":
            return [(self.n_neighbours, windows(w)) for w in sorted({w for _, w in AUTO_SEARCH})]
        if self.windows != "auto":
            return [(k, tuple(self.windows)) for k in sorted({k for k, _ in AUTO_SEARCH})]
        return [(k, windows(w)) for k, w in AUTO_SEARCH]

    def _auto_settings(self, images: Sequence[np.ndarray], sizes_hw, progress: Progress) -> dict:
        """The frame, where `resize` is "auto": the smallest candidate that keeps the images' detail. K and the
        windows are chosen later, on the fitted model itself (`_choose_search`)."""
        if self.resize != "auto":
            return {}
        native = int(np.clip(round(np.median([max(hw) for hw in sizes_hw]) / 32) * 32, 256, AUTO_MAX_SIDE))
        frames = [self._fit_frame(sizes_hw, side) for side in sorted({min(s, native) for s in AUTO_SIDES} | {native})]
        frame, losses = auto_settings.detail_keeping_frame(images, frames, self.seed)
        return {"long_side": max(frame), "detail_lost": losses,
                "why": f"input {frame[0]} x {frame[1]} px (H x W), the smallest frame that keeps the images' "
                       f"detail (share of their variance lost by resizing: {losses})"}

    def _choose_search(self, images: Sequence[np.ndarray], progress: Progress) -> dict:
        """K and the windows, on this fitted model: held-out training images, and synthetic defects pasted into
        them, are scored under each candidate with their own image left out of the retrieval (CPR keeps every
        training image, so that is exactly a model without it). The cheapest candidate wins unless a dearer one
        separates them better by more than the noise; the search stops at the first dearer candidate that
        does not."""
        search = self._search_candidates()
        if len(images) < auto_settings.MIN_IMAGES:
            k, windows = search[-1]
            return {"n_neighbours": k, "windows": list(windows),
                    "why": f"{len(images)} training images are too few to hold any out: every image retrieved and "
                           f"the widest windows {list(windows)}"}
        start = time.perf_counter()
        held = auto_settings.hold_out(images, self.seed, most=AUTO_HELD_OUT)
        own = torch.from_numpy(held.held_out_index[held.groups])        # the training image each row came from
        k_max = max(k for k, _ in search)
        pre = self.preprocess
        batches, feats, nearest = [], [], []
        for i in range(0, len(held.images), 16):
            x = pre.images_to_tensor(held.images[i:i + 16])
            with torch.no_grad():
                f = self.embed(x)
            batches.append(x)
            feats.append(f)
            nearest.append(self.retrieve(self._histograms(f[0]), k_max, exclude=own[i:i + 16]))
        grid = tuple(feats[0][0].shape[-2:])
        coverage = auto_settings.grid_masks(held.masks, pre.mask_to_frame, grid)
        rows, best = [], None
        for step, (k, windows) in enumerate(search):
            scores, cells = [], []
            for x, f, near in zip(batches, feats, nearest):
                s, maps = self._score_features(f, tuple(x.shape[-2:]), near[:, :k], windows)
                scores.append(s)
                cells.append(F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0])
            row = {"n_neighbours": int(k), "windows": list(windows),
                   **auto_settings.separation_with_error(held.labels, held.groups, torch.cat(scores).numpy(),
                                                         torch.cat(cells).numpy(), coverage)}
            rows.append(row)
            progress("auto settings", step + 1, len(search))
            if best is not None and row["separation"] <= best["separation"] + auto_settings.TOLERANCE:
                break
            best = row if best is None or row["separation"] > best["separation"] else best
        chosen = auto_settings.cheapest_within(rows)
        for row in rows:   # the bootstrap values served the choice; the record keeps the summary
            row["se"] = round(float(np.nanstd(row.pop("bootstrap")["separation"])), 4)
        return {"seconds": round(time.perf_counter() - start, 1), "candidates": rows,
                "n_held_out": int(len(held.held_out_index)), "n_synthetic_defects": int(held.labels.sum()),
                "n_neighbours": chosen["n_neighbours"], "windows": chosen["windows"],
                "why": f"{chosen['n_neighbours']} images retrieved, windows {chosen['windows']}; chosen on "
                       f"{len(held.held_out_index)} held-out good images and {int(held.labels.sum())} synthetic "
                       f"defects, which they separate by {chosen['separation']:.3f} (best candidate "
                       f"{max(r['separation'] for r in rows):.3f}; a cheaper setting wins unless a dearer one is "
                       "better by more than the noise)"}

    def fold_params(self) -> dict:
        return {**super().fold_params(), "n_neighbours": self.n_neighbours_, "windows": self.windows_}

    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        n = len(images)
        rng = np.random.default_rng(self.seed)
        banks: list[torch.Tensor] | None = None
        for start, batch in image_batches(images, batch_size):
            with torch.no_grad():
                feats = self.embed(self.preprocess.images_to_tensor(batch))
            if banks is None:
                banks = [torch.empty((n, *f.shape[1:]), dtype=torch.float16) for f in feats]
            for bank, f in zip(banks, feats):
                bank[start:start + len(batch)] = f.half()
            progress("features", start + len(batch), n)
        self.banks_ = banks
        finest = banks[0]
        channels = finest.shape[1]
        patches = finest.permute(0, 2, 3, 1).reshape(-1, channels)
        sample = patches[torch.from_numpy(rng.permutation(len(patches))[:WORD_SAMPLE])].float().numpy()
        kmeans = KMeans(min(self.n_words, len(sample)), n_init=3, random_state=int(self.seed)).fit(sample)
        self.words_ = torch.from_numpy(kmeans.cluster_centers_).float()
        self.histograms_ = torch.cat([self._histograms(finest[i:i + 64].float()) for i in range(0, n, 64)])
        progress("retrieval index", 1, 1)
        self.foreground_ = self._fit_foreground(finest, rng) if self.foreground else None
        if "auto" in (self.n_neighbours, self.windows):
            search = self._choose_search(images, progress)
            frame_why = self.auto_settings_.get("why")
            self.auto_settings_ = {**self.auto_settings_, **search,
                                   "why": "; ".join(w for w in (frame_why, search["why"]) if w)}
        self.n_neighbours_ = int(self.auto_settings_.get("n_neighbours", self.n_neighbours))
        self.windows_ = tuple(int(w) for w in self.auto_settings_.get("windows", self.windows))

    def _fit_foreground(self, finest: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The paper's unsupervised object estimate: two k-means clusters; the commoner one on the grid's
        border band is background; a linear discriminant of border background against centre object patches,
        its output scaled to [0, 1] between its 1st and 99th percentiles on the training patches."""
        n, c, h, w = finest.shape
        feats = finest.permute(0, 2, 3, 1).float().numpy()                          # (N, h, w, C)
        band_h, band_w = max(1, int(BACKGROUND_BAND * h)), max(1, int(BACKGROUND_BAND * w))
        border = np.zeros((h, w), bool)
        border[:band_h], border[-band_h:], border[:, :band_w], border[:, -band_w:] = True, True, True, True
        centre = np.zeros((h, w), bool)
        ch, cw = int(OBJECT_HALF_SIDE * h), int(OBJECT_HALF_SIDE * w)
        centre[h // 2 - ch:h // 2 + ch, w // 2 - cw:w // 2 + cw] = True
        flat = feats.reshape(-1, c)
        two = KMeans(2, n_init=3, random_state=int(self.seed)).fit(flat[rng.permutation(len(flat))[:WORD_SAMPLE]])
        codes = two.predict(flat).reshape(n, h, w)
        background_code = np.bincount(codes[:, border].ravel(), minlength=2).argmax()
        background = feats[:, border][codes[:, border] == background_code]
        objects = feats[:, centre][codes[:, centre] != background_code]
        m = min(FOREGROUND_SAMPLE, len(background), len(objects))
        if m < 10:
            raise ValueError("foreground=True found no object distinct from the background at the image border: "
                             "use foreground=False for images the object fills")
        lda = LinearDiscriminantAnalysis().fit(
            np.concatenate([background[rng.permutation(len(background))[:m]], objects[rng.permutation(len(objects))[:m]]]),
            np.r_[np.zeros(m, int), np.ones(m, int)])
        decision = lda.decision_function(flat[rng.permutation(len(flat))[:WORD_SAMPLE]])
        low, high = np.quantile(decision, [0.01, 0.99])
        scale = max(high - low, 1e-6)
        return torch.from_numpy(np.r_[lda.coef_[0] / scale, (lda.intercept_[0] - low) / scale]).float()

    def _histograms(self, finest: torch.Tensor) -> torch.Tensor:
        n, c, h, w = finest.shape
        words = torch.cdist(finest.permute(0, 2, 3, 1).reshape(n, -1, c), self.words_[None].expand(n, -1, -1))
        return block_histograms(words.argmin(-1).view(n, h, w), len(self.words_), self.blocks)

    def _object_weight(self, finest: torch.Tensor) -> torch.Tensor:
        """(N, h, w) estimated object share of each finest-stage cell, in [0, 1]."""
        weight, bias = self.foreground_[:-1], self.foreground_[-1]
        return (torch.einsum("nchw,c->nhw", finest.float(), weight) + bias).clamp(0, 1)

    # --- scoring --------------------------------------------------------------------------------------
    def retrieve(self, histograms: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(N, k) indices of the training images nearest to each query's block histograms (N, B, W), nearest
        first; `exclude` (N,) names a training image each query may not retrieve (its own)."""
        eps = 1e-8
        q, refs = histograms[:, None] + eps, self.histograms_[None] + eps        # (N, 1, B, W), (1, M, B, W)
        kl = (q * torch.log(q / refs)).sum(-1)                                    # (N, M, B)
        keep = max(1, int(kl.shape[-1] * self.block_share))
        distance = kl.sort(-1).values[..., :keep].sum(-1)                         # (N, M)
        available = distance.shape[1]
        if exclude is not None:
            distance[torch.arange(len(distance)), exclude] = float("inf")
            available -= 1
        return distance.topk(max(1, min(k, available)), dim=1, largest=False).indices

    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = self.embed(x)
        near = self.retrieve(self._histograms(feats[0]), self.n_neighbours_)
        scores, maps = self._score_features(feats, tuple(x.shape[-2:]), near, self.windows_)
        return scores.numpy(), maps.numpy().astype(np.float32)

    def _score_features(self, feats: list[torch.Tensor], size: tuple[int, int], near: torch.Tensor,
                        windows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N,) and maps (N, H, W) of embedded queries against their retrieved images `near` (N, K)."""
        n = len(near)
        maps = torch.zeros((n, *size))
        for f, bank, window in zip(feats, self.banks_, windows):
            grid = torch.stack([window_min_distance(f[i], bank[near[i]].float(), window) for i in range(n)])
            maps += upsample_blur(grid, size, 0.0)
        if self.foreground_ is not None:
            own = self._object_weight(feats[0])
            retrieved = torch.stack([self._object_weight(self.banks_[0][near[i]]).amax(0) for i in range(n)])
            maps *= upsample_blur(torch.maximum(own, retrieved), size, 0.0)
        maps = self._blur(maps)
        top = max(1, int(round(self.top_share * size[0] * size[1])))
        return maps.flatten(1).topk(top, dim=1).values.mean(1), maps

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        """Gaussian blur at full resolution (an upsample to the same size is the identity)."""
        if self.blur_sigma <= 0:
            return maps
        return upsample_blur(maps, tuple(maps.shape[-2:]), self.blur_sigma)

    # --- persistence ----------------------------------------------------------------------------------
    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"bank.{i}": b for i, b in enumerate(self.banks_)}
        tensors.update(words=self.words_, histograms=self.histograms_)
        if self.foreground_ is not None:
            tensors["foreground"] = self.foreground_
        return tensors

    def _fitted_json(self) -> dict:
        return {"n_neighbours": self.n_neighbours_, "windows": list(self.windows_)}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        # Models saved before "auto" existed kept K and windows in their parameters only.
        self.n_neighbours_ = int(fitted.get("n_neighbours", self.n_neighbours))
        self.windows_ = tuple(fitted.get("windows", self.windows))
        self.banks_ = [tensors[f"bank.{i}"] for i in range(len(self.stages))]
        self.words_, self.histograms_ = tensors["words"], tensors["histograms"]
        self.foreground_ = tensors.get("foreground")

    def _card_extra(self) -> dict:
        return {"backbone": {"note": "the paper uses DenseNet201 with a learned local-retrieval head; neither is "
                                     "available offline: raw, L2-normalised features of this backbone stand in"},
                "retrieval": {"training_images": int(self.banks_[0].shape[0]), "neighbours": self.n_neighbours_,
                              "windows": list(self.windows_), "words": int(len(self.words_)),
                              "blocks": self.blocks, "foreground": self.foreground_ is not None},
                "score": f"cosine distance to the nearest patch in the window of the {self.n_neighbours_} retrieved "
                         f"images, per stage, summed and blurred; image = mean of the top {self.top_share:.1%}"}

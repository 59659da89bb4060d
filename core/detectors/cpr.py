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

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from ..backbones import DEFAULT_BACKBONE
from .base import BackboneDetector, Progress, register_detector
from .ops import upsample_blur

# Global retrieval: words fitted on at most this many finest-stage patches.
WORD_SAMPLE = 50_000
# Foreground estimate (the paper's values): the border band taken as background and the centre square taken
# as object, as shares of the grid; the classifier's output is clipped to [0, 1] between its 1st and 99th
# percentiles on the training patches.
BACKGROUND_BAND, OBJECT_HALF_SIDE, FOREGROUND_SAMPLE = 3 / 80, 1 / 5, 15_000
# A padded window position: never the nearest.
FAR = 4.0


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
    reference maps (K, C, h, w; unit norm) within a window x window neighbourhood of the same position."""
    r = window // 2
    padded = F.pad(refs, (r, r, r, r))
    valid = F.pad(torch.ones(1, 1, *refs.shape[-2:], dtype=refs.dtype), (r, r, r, r))
    h, w = query.shape[-2:]
    best = torch.full((h, w), FAR, dtype=refs.dtype)
    for dy in range(window):
        for dx in range(window):
            shifted = padded[:, :, dy:dy + h, dx:dx + w]
            dist = 1 - (query[None] * shifted).sum(1).amax(0)          # nearest of the K images
            dist = torch.where(valid[0, 0, dy:dy + h, dx:dx + w] > 0, dist, torch.full_like(dist, FAR))
            best = torch.minimum(best, dist)
    return best


@register_detector("cpr", family="representation")
class CPR(BackboneDetector):
    """CPR anomaly detector: global retrieval of similar training images, then local patch retrieval.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
        Default: EfficientNet-Lite0 stages 1 and 2 (strides 4 and 8, as the paper's scales 4 and 8).
    resize : the longer side of the input with the aspect ratio kept, "auto" (default: the training images'
        median longer side within 256..512 px) or (h, w) for an exact frame.
    crop : centre crop after resizing; None (default) keeps the whole image.
    n_neighbours : K, training images retrieved per test image (paper: 10).
    windows : local retrieval window side, per stage, in cells (paper: 3 at stride 4, 1 at stride 8).
    n_words, blocks, block_share : global retrieval's visual words (paper: 12), blocks per side (5) and the
        share of best-matching blocks that decide (4/5).
    foreground : weight the map by an estimate of the object (True), or not (False, default).
    blur_sigma : Gaussian blur of the summed, upsampled distance map (paper: 4).
    top_share : the image score is the mean of this highest share of the map's pixels.

    Attributes
    ----------
    banks_ : per stage, (N, C, h, w) float16 unit-norm features of the training images.
    words_ : (n_words, C) visual words over the finest stage.
    histograms_ : (N, blocks^2, n_words) block histograms of the training images.
    foreground_ : (C + 1,) weights and bias of the foreground classifier, scaled to [0, 1] (None without).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2), weights: str | None = None,
                 resize: int | str | tuple = "auto", crop: int | None = None, n_neighbours: int = 10,
                 windows: tuple = (3, 1), n_words: int = 12, blocks: int = 5, block_share: float = 0.8,
                 foreground: bool = False, blur_sigma: float = 4.0, top_share: float = 0.005,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        self.backbone = backbone
        self.stages = stages
        self.weights = weights
        self.resize = resize
        self.crop = crop
        self.n_neighbours = n_neighbours
        self.windows = windows
        self.n_words = n_words
        self.blocks = blocks
        self.block_share = block_share
        self.foreground = foreground
        self.blur_sigma = blur_sigma
        self.top_share = top_share
        self.calibration_fraction = calibration_fraction
        self.seed = seed
        self.device = device

    def _validate(self) -> None:
        self._require_stages()
        self._require_positive("n_neighbours", "n_words", "blocks")
        if len(self.windows) != len(self.stages) or not all(isinstance(w, int) and w >= 1 and w % 2 == 1
                                                            for w in self.windows):
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
    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        self._validate()
        n = len(images)
        rng = np.random.default_rng(self.seed)
        banks: list[torch.Tensor] | None = None
        for start in range(0, n, batch_size):
            batch = [images[i] for i in range(start, min(start + batch_size, n))]
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
    def retrieve(self, histograms: torch.Tensor) -> torch.Tensor:
        """(N, K) indices of the training images nearest to each query's block histograms (N, B, W)."""
        eps = 1e-8
        q, refs = histograms[:, None] + eps, self.histograms_[None] + eps        # (N, 1, B, W), (1, M, B, W)
        kl = (q * torch.log(q / refs)).sum(-1)                                    # (N, M, B)
        keep = max(1, int(kl.shape[-1] * self.block_share))
        distance = kl.sort(-1).values[..., :keep].sum(-1)                         # (N, M)
        return distance.topk(min(self.n_neighbours, distance.shape[1]), dim=1, largest=False).indices

    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = self.embed(x)
        near = self.retrieve(self._histograms(feats[0]))
        size = tuple(x.shape[-2:])
        maps = torch.zeros((len(x), *size))
        for f, bank, window in zip(feats, self.banks_, self.windows):
            grid = torch.stack([window_min_distance(f[i], bank[near[i]].float(), window) for i in range(len(x))])
            maps += upsample_blur(grid, size, 0.0)
        if self.foreground_ is not None:
            own = self._object_weight(feats[0])
            retrieved = torch.stack([self._object_weight(self.banks_[0][near[i]]).amax(0) for i in range(len(x))])
            maps *= upsample_blur(torch.maximum(own, retrieved), size, 0.0)
        maps = self._blur(maps)
        top = max(1, int(round(self.top_share * size[0] * size[1])))
        scores = maps.flatten(1).topk(top, dim=1).values.mean(1)
        return scores.numpy(), maps.numpy().astype(np.float32)

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

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.banks_ = [tensors[f"bank.{i}"] for i in range(len(self.stages))]
        self.words_, self.histograms_ = tensors["words"], tensors["histograms"]
        self.foreground_ = tensors.get("foreground")

    def _card_extra(self) -> dict:
        ex = self.feature_extractor()
        return {"backbone": {"name": self.backbone, "stages": list(self.stages), "channels": list(ex.channels),
                             "strides": list(ex.strides),
                             "note": "the paper uses DenseNet201 with a learned local-retrieval head; neither is "
                                     "available offline: raw, L2-normalised features of this backbone stand in"},
                "retrieval": {"training_images": int(self.banks_[0].shape[0]), "neighbours": self.n_neighbours,
                              "windows": list(self.windows), "words": int(len(self.words_)),
                              "blocks": self.blocks, "foreground": self.foreground_ is not None},
                "score": f"cosine distance to the nearest patch in the window of the {self.n_neighbours} retrieved "
                         f"images, per stage, summed and blurred; image = mean of the top {self.top_share:.1%}"}

"""What the reconstruction family shares: DCGAN-style networks, SSIM, the training loop and map -> score.

The detectors in this family (``ae``, ``dae``, ``vae``, ``ganomaly``) learn to reconstruct normal images and
call a region anomalous when it reconstructs badly. Each detector module holds only its network and its loss;
this module holds everything they have in common, so that the four stay comparable:

Inputs
    Squash-resized to ``resize x resize`` (the networks need a square input) with no crop by default (a reconstruction model sees the whole
    image), scaled to [-1, 1] (mean = std = 0.5, not ImageNet statistics: there is no pretrained backbone),
    and reconstructed through a ``tanh``. Errors and SSIM are measured in [0, 1] intensity units.

Networks
    :class:`ConvEncoder` / :class:`ConvDecoder` are the DCGAN pyramids GANomaly uses (Akcay et al. 2018,
    following Radford et al. 2016): stride-2 4x4 convolutions halve the size down to 4x4, a 4x4 convolution
    maps to a 1x1 latent vector, and transposed convolutions mirror it back. Widths double from
    ``base_channels`` per level, capped at ``max_channels`` to keep CPU training affordable.

Training
    :func:`train_epochs`: Adam, shuffled mini-batches (a lone last sample is skipped: BatchNorm needs two),
    ``progress("train", epoch, epochs)`` after every epoch (raise :class:`core.Cancelled` from it to stop), and
    a per-epoch loss history. All randomness (weight init, shuffling, noise, masks) runs inside
    ``torch.random.fork_rng`` seeded with ``seed``, so fitting twice gives identical weights on CPU and the
    caller's global RNG is left untouched. All training images are used for training; there is no held-out
    validation split (the sets are small, and nothing here is tuned on validation).
    After training, BatchNorm running statistics are recomputed over the whole training set in one pass
    (:func:`recalibrate_batchnorm`): with few epochs the exponential averages lag far behind the weights, and a
    model scored in eval mode with stale statistics reconstructs nothing well.

Anomaly maps and scores
    :func:`error_map`: per-pixel L2 norm of the reconstruction error over the RGB channels, plus
    ``ssim_weight * (1 - SSIM)`` (local structural dissimilarity, Bergmann et al. 2019) when ``ssim_weight > 0``,
    then Gaussian-blurred with ``blur_sigma`` (pixels of the model input). :func:`score_from_map`: the image score
    is the mean of the ``score_topk`` fraction of highest map values (0 = the maximum).

    The defaults were picked by measurement: one ``ae`` (128 px, 40 epochs, seed 0) per category, image AUROC
    of each aggregation of the same maps (top-k = mean of the top k fraction; "mean" = whole map):

    ====================  =====  ========  ======  ======  =====  ===========
    map                   max    top 0.1%  top 1%  top 5%  mean   pixel AUROC
    ====================  =====  ========  ======  ======  =====  ===========
    bottle, L2, blur 0    0.904  0.925     0.966   0.945   0.838  0.853
    bottle, L2, blur 4    0.971  0.973     0.975   0.958   0.838  0.939
    bottle, L2+SSIM, b 4  0.967  0.968     0.971   0.963   0.853  0.954
    magnetic, L2, blur 0  0.584  0.616     0.654   0.675   0.633  0.539
    magnetic, L2, blur 4  0.676  0.679     0.703   0.720   0.629  0.574
    magnetic, L2+SSIM, 4  0.647  0.649     0.665   0.669   0.601  0.636
    ====================  =====  ========  ======  ======  =====  ===========

    Hence blur 4 and the top-1% mean (best on bottle, close to best on magnetic_tile; the maximum alone is
    noisier). The SSIM term (here only in the map, with an L2-trained model) helps pixel AUROC but not image
    AUROC, so ``ssim_weight`` defaults to 0; set it to 1 for sharper localisation.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Preprocess, image_batches
from .base import Detector, Progress, resolve_device, seeded
from .ops import upsample_blur

# Model inputs are scaled to [-1, 1] and reconstructed through tanh.
MEAN = STD = (0.5, 0.5, 0.5)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] intensities."""
    return x * 0.5 + 0.5


# ------------------------------------------------------------------------------------------------ SSIM

def _gaussian_window(sigma: float, radius: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5,
             k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of two (N, C, H, W) batches, averaged over channels: (N, H, W).

    Gaussian-weighted statistics (sigma 1.5, an 11-tap window: radius = int(3.5 sigma + 0.5), scipy's default
    truncation), population (not sample) covariances, borders padded by reflection. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
    away from the borders. Differentiable, so it also serves as a training loss.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim_map expects two equal (N, C, H, W) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    n, c, h, w = a.shape
    radius = int(3.5 * sigma + 0.5)
    g = _gaussian_window(sigma, radius, a.device, a.dtype)
    pad = min(radius, h - 1, w - 1)
    if pad < radius:  # tiny images: shrink the window to what reflection padding allows
        g = _gaussian_window(sigma, pad, a.device, a.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (pad, pad, pad, pad), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(t.shape[1], 1, 1, -1), groups=t.shape[1])
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(t.shape[1], 1, -1, 1), groups=t.shape[1])

    # One grouped convolution over the five moment images of every channel.
    stats = blur(torch.cat([a, b, a * a, b * b, a * b], dim=1))
    mu_a, mu_b, aa, bb, ab = stats.split(c, dim=1)
    var_a = aa - mu_a * mu_a
    var_b = bb - mu_b * mu_b
    cov = ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image: (N,)."""
    return ssim_map(a, b, data_range).flatten(1).mean(dim=1)


# ------------------------------------------------------------------------------------------------ networks

def pyramid_widths(size: int, base: int, cap: int) -> list[int]:
    """Channel widths of the stride-2 levels that take `size` down to 4x4."""
    levels = int(math.log2(size // 4))
    return [min(base * 2 ** i, cap) for i in range(levels)]


class ConvEncoder(nn.Module):
    """DCGAN encoder: (N, 3, S, S) -> (N, latent, 1, 1); `features` is everything before the last conv."""

    def __init__(self, size: int, latent: int, base: int, cap: int, in_channels: int = 3):
        super().__init__()
        widths = pyramid_widths(size, base, cap)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(widths[-1], latent, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """DCGAN decoder: (N, latent, 1, 1) -> (N, 3, S, S) in [-1, 1]."""

    def __init__(self, size: int, latent: int, base: int, cap: int, out_channels: int = 3):
        super().__init__()
        widths = pyramid_widths(size, base, cap)[::-1]
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.'s initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def recalibrate_batchnorm(forward: Callable[[torch.Tensor], object], modules: nn.Module, data: torch.Tensor,
                          batch_size: int, device: torch.device) -> None:
    """Recompute every BatchNorm's running mean/var as exact averages over `data` (one pass, train mode)."""
    bns = [m for m in modules.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the exact mean over the batches seen
    was_training = modules.training
    modules.train()
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start:start + batch_size]
            if len(batch) < 2 and len(data) >= 2:
                continue
            forward(batch.to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        modules.train(was_training)


# ------------------------------------------------------------------------------------------------ training

def train_epochs(step: Callable[[torch.Tensor], dict], data: torch.Tensor, epochs: int, batch_size: int,
                 device: torch.device, progress: Progress, stage: str = "train") -> list[dict]:
    """Run `step(batch)` over shuffled mini-batches for `epochs`; returns per-epoch means of its loss dicts.

    `step` does the forward pass, backward pass and optimiser step and returns floats (at least "loss").
    Must run inside :class:`seeded` for reproducible shuffling.
    """
    history = []
    n = len(data)
    for epoch in range(epochs):
        order = torch.randperm(n)
        sums: dict[str, float] = {}
        seen = 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm cannot train on one sample; it gets its turn in another epoch
            parts = step(data[idx].to(device))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            seen += len(idx)
        record = {k: v / max(seen, 1) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in record.values()):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: {record} (try a lower lr)")
        history.append(record)
        progress(stage, epoch + 1, epochs)
    return history


def load_tensor(preprocess: Preprocess, images: Sequence[np.ndarray], progress: Progress,
                batch_size: int = 32) -> torch.Tensor:
    """All images preprocessed into one (N, 3, S, S) CPU tensor, decoding in batches with progress."""
    out = []
    for start, batch in image_batches(images, batch_size):
        out.append(preprocess.images_to_tensor(batch))
        progress("load", start + len(batch), len(images))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ maps and scores

def error_map(x: torch.Tensor, recon: torch.Tensor, ssim_weight: float, blur_sigma: float) -> torch.Tensor:
    """(N, S, S) anomaly map of inputs `x` and reconstructions `recon` (both in [-1, 1] model space)."""
    a, b = to_unit(x), to_unit(recon)
    amap = (a - b).pow(2).sum(dim=1).sqrt()
    if ssim_weight > 0:
        amap = amap + ssim_weight * (1 - ssim_map(a, b))
    if blur_sigma > 0:
        size = tuple(amap.shape[-2:])
        # The blur's reflected border needs radius 4 sigma < size: tiny inputs get a narrower blur.
        amap = upsample_blur(amap, size, min(blur_sigma, (min(size) - 1) / 4))
    return amap


def score_from_map(maps: torch.Tensor, topk: float) -> torch.Tensor:
    """(N,) image scores: mean of the top `topk` fraction of each map's values (topk = 0: the maximum)."""
    flat = maps.flatten(1)
    if topk <= 0:
        return flat.max(dim=1).values
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, ssim_weight: float) -> tuple[torch.Tensor, dict]:
    """Mean squared error in [0, 1] units, plus ssim_weight * mean(1 - SSIM): the term the map scores."""
    a, b = to_unit(x), to_unit(recon)
    mse = F.mse_loss(b, a)
    parts = {"mse": mse.item()}
    loss = mse
    if ssim_weight > 0:
        dssim = (1 - ssim_map(a, b)).mean()
        loss = loss + ssim_weight * dssim
        parts["dssim"] = dssim.item()
    return loss, parts


# ------------------------------------------------------------------------------------------------ the base class

class ReconstructionDetector(Detector):
    """Base of the family: preprocessing, fit/score plumbing, persistence of one `nn.Module` and the card.

    Subclasses implement `_build()` (the network, an `nn.Module`), `_train(net, data, device, progress)`
    (returns the per-epoch loss history) and `_reconstruct(net, x)` (the reconstruction a map is made from).
    They may override `_scores_and_maps(net, x)` when the score is not taken from the map (GANomaly).
    Every subclass has the parameters resize, crop, latent_dim, base_channels, max_channels, epochs,
    batch_size, lr, ssim_weight, blur_sigma, score_topk, seed and device.
    """

    square_input = True  # the DCGAN pyramid halves a square down to 4 x 4
    cross_fit = False    # trained networks: five more trainings would be too dear

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(resize=self.frame(), crop=self.crop, mean=MEAN, std=STD)

    # --- subclass hooks ---------------------------------------------------------------------------
    def _build(self) -> nn.Module:
        raise NotImplementedError

    def _train(self, net: nn.Module, data: torch.Tensor, device: torch.device, progress: Progress) -> list[dict]:
        raise NotImplementedError

    def _reconstruct(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _scoring_modules(self, net: nn.Module) -> nn.Module:
        """The part of `net` used at scoring time (its BatchNorms are recalibrated after training)."""
        return net

    def _calibrate(self, net: nn.Module, data: torch.Tensor, device: torch.device) -> dict:
        """Fitted constants computed on the training set after training (JSON-able); none by default."""
        return {}

    def _scores_and_maps(self, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = error_map(x, self._reconstruct(net, x), self.ssim_weight, self.blur_sigma)
        return score_from_map(maps, self.score_topk), maps

    # --- checks -----------------------------------------------------------------------------------
    def _validate(self) -> None:
        self._require_positive("epochs", "batch_size", "latent_dim", "base_channels", "max_channels")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm)")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.ssim_weight < 0 or self.blur_sigma < 0:
            raise ValueError("ssim_weight and blur_sigma must be >= 0")
        if not 0 <= self.score_topk <= 1:
            raise ValueError(f"score_topk must be in [0, 1], got {self.score_topk}")

    # --- Detector hooks ---------------------------------------------------------------------------
    def _fit(self, images: Sequence[np.ndarray], progress: Progress) -> None:
        size = self.preprocess.input_size      # known once fit has fixed the frame
        if size < 16 or size & (size - 1):
            raise ValueError(f"the model input size (crop, or resize when crop is None) must be a power of two "
                             f">= 16, got {size}")
        if len(images) < 2:
            raise ValueError("a reconstruction model needs at least 2 training images")
        device = resolve_device(self.device)
        data = load_tensor(self.preprocess, images, progress)
        start = time.perf_counter()
        # Nothing is stored on self until training has finished: a cancelled fit leaves the detector unfitted.
        with seeded(int(self.seed), device):
            net = self._build().to(device)
            history = self._train(net, data, device, progress)
        scoring = self._scoring_modules(net)
        recalibrate_batchnorm(lambda b: self._reconstruct(net, b), scoring, data, self.batch_size, device)
        net.eval()
        info = {"epochs": int(self.epochs), "final_loss": history[-1], "loss_history": history,
                "train_seconds": time.perf_counter() - start, "device": str(device)}
        info.update(self._calibrate(net, data, device))
        self.net_, self.train_info_ = net, info

    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        device = next(self.net_.parameters()).device
        scores, maps = self._scores_and_maps(self.net_, x.to(device))
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._scoring_modules(self.net_).state_dict())  # only what scoring needs

    def _fitted_json(self) -> dict:
        return self.train_info_

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        net = self._build()
        self._scoring_modules(net).load_state_dict(tensors)
        self.net_ = net.to(resolve_device(self.device)).eval()
        self.train_info_ = fitted

    def _card_extra(self) -> dict:
        size = self.preprocess.input_size
        scoring = self._scoring_modules(self.net_)
        return {"architecture": {"network": type(self.net_).__name__, "input_size": size,
                                 "input_range": "[-1, 1] (mean = std = 0.5), tanh output",
                                 "latent_dim": int(self.latent_dim),
                                 "widths": pyramid_widths(size, self.base_channels, self.max_channels),
                                 "parameters": count_parameters(self.net_),
                                 "scoring_parameters": count_parameters(scoring)},
                "training": {k: v for k, v in self.train_info_.items() if k != "loss_history"},
                "anomaly_map": self._map_description()}

    def _map_description(self) -> str:
        ssim = f" + {self.ssim_weight} * (1 - SSIM)" if self.ssim_weight > 0 else ""
        agg = "maximum" if self.score_topk <= 0 else f"mean of the top {self.score_topk:.2%} pixels"
        return (f"per-pixel L2 reconstruction error over RGB{ssim}, Gaussian blur sigma {self.blur_sigma} px; "
                f"image score = {agg} of the map")

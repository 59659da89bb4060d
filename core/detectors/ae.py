"""Convolutional autoencoder: the plainest reconstruction baseline.

A DCGAN-style encoder squeezes each image into a `latent_dim` vector and a mirrored decoder rebuilds it
(Bergmann et al., "Improving Unsupervised Defect Segmentation by Applying Structural Similarity to
Autoencoders", VISAPP 2019, use the same shape: 128 px input, a ~100-d bottleneck, L2 or SSIM loss). Trained
on normal images only; where it cannot rebuild the input, something unusual is there. Shared parts (networks,
SSIM, training loop, map -> score) live in :mod:`._reconstruction`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import register_detector, store_params
from ._reconstruction import (ConvDecoder, ConvEncoder, ReconstructionDetector, dcgan_init, reconstruction_loss,
                              train_epochs)


class AutoEncoderNet(nn.Module):
    def __init__(self, size: int, latent: int, base: int, cap: int):
        super().__init__()
        self.encoder = ConvEncoder(size, latent, base, cap)
        self.decoder = ConvDecoder(size, latent, base, cap)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_detector("ae", family="reconstruction", summary=(
                   "Learns to redraw good images and flags what it cannot redraw; a simple baseline, trains "
                   "for minutes."))
class AutoEncoder(ReconstructionDetector):
    """Convolutional autoencoder.

    Parameters
    ----------
    resize, crop : model input geometry (squash-resize, optional centre crop); the input size must be a power of two.
    latent_dim : bottleneck width (a vector: the whole image passes through it).
    base_channels, max_channels : width of the first encoder level, doubled per level up to the cap.
    epochs, batch_size, lr : Adam training on all training images.
    ssim_weight : weight of the (1 - SSIM) term in both the loss and the anomaly map (0 = L2 only).
    blur_sigma : Gaussian blur of the error map, in model-input pixels.
    score_topk : image score = mean of this fraction of the highest map pixels (0 = maximum).
    seed, device : reproducibility; "auto" uses CUDA when available.
    """

    def __init__(self, resize: int = 128, crop: int | None = None, latent_dim: int = 128, base_channels: int = 32,
                 max_channels: int = 256, epochs: int = 40, batch_size: int = 16, lr: float = 1e-3,
                 ssim_weight: float = 0.0, blur_sigma: float = 4.0, score_topk: float = 0.01,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _build(self) -> nn.Module:
        return AutoEncoderNet(self.preprocess.input_size, self.latent_dim, self.base_channels, self.max_channels)

    def _reconstruct(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x)

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The network's training input for a clean batch: unchanged here; the denoising AE overrides it."""
        return x

    def _train(self, net, data, device, progress):
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        net.train()

        def step(x):
            loss, parts = reconstruction_loss(x, net(self._corrupt(x)), self.ssim_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item(), **parts}
        return train_epochs(step, data, self.epochs, self.batch_size, device, progress)

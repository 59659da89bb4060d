"""Denoising autoencoder: the convolutional autoencoder trained to undo corruption.

Same network as :mod:`.ae`; during training each input is corrupted (Gaussian noise with std `noise_std` in
[0, 1] intensity units, and a `mask_ratio` fraction of `mask_patch`-pixel squares set to mid-grey), while the
loss compares the output with the clean image (Vincent et al., ICML 2008). The model then has to infer
content from context instead of copying it, which makes it less able to reproduce unseen defects. Scored on
clean inputs exactly like the plain autoencoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ae import AutoEncoder
from .base import register_detector, store_params


@register_detector("dae", family="reconstruction", summary=(
                   "An autoencoder trained to remove noise and masks from good images; a baseline, trains for "
                   "minutes."))
class DenoisingAutoEncoder(AutoEncoder):
    """Denoising convolutional autoencoder.

    Parameters
    ----------
    noise_std : std of the additive Gaussian noise, in [0, 1] intensity units (0 = none).
    mask_ratio : expected fraction of `mask_patch` x `mask_patch` squares replaced by mid-grey (0 = none).
    mask_patch : side of those squares, in pixels (an int >= 1).
    Others : as :class:`.ae.AutoEncoder`.
    """

    def __init__(self, resize: int = 128, crop: int | None = None, latent_dim: int = 128, base_channels: int = 32,
                 max_channels: int = 256, epochs: int = 40, batch_size: int = 16, lr: float = 1e-3,
                 noise_std: float = 0.1, mask_ratio: float = 0.25, mask_patch: int = 8, ssim_weight: float = 0.0,
                 blur_sigma: float = 4.0, score_topk: float = 0.01,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        super()._validate()
        if self.noise_std < 0 or not 0 <= self.mask_ratio < 1 or self.mask_patch < 1:
            raise ValueError("need noise_std >= 0, 0 <= mask_ratio < 1 and mask_patch >= 1")
        if self.noise_std == 0 and self.mask_ratio == 0:
            raise ValueError("a denoising autoencoder needs noise_std > 0 or mask_ratio > 0 (else use 'ae')")

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_std > 0:
            x = x + torch.randn_like(x) * (2 * self.noise_std)  # model space [-1, 1] is twice [0, 1]
        if self.mask_ratio > 0:
            n, _, h, w = x.shape
            cells = torch.rand(n, 1, -(-h // self.mask_patch), -(-w // self.mask_patch), device=x.device)
            keep = F.interpolate((cells >= self.mask_ratio).float(), scale_factor=self.mask_patch, mode="nearest")
            x = x * keep[..., :h, :w]  # 0 in model space is mid-grey
        return x.clamp(-1, 1)

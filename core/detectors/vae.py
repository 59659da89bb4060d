"""Variational autoencoder (Kingma & Welling, ICLR 2014) as a reconstruction-based detector.

The encoder outputs the mean and log-variance of a diagonal Gaussian over the `latent_dim` code; training
decodes a sample drawn with the reparameterisation trick (z = mu + sigma * eps) and minimises

    loss = reconstruction + kl_weight * KL(q(z|x) || N(0, I)) / (3 * S * S)

where the reconstruction term is the mean squared error per input value (plus the SSIM term when
`ssim_weight > 0`) and the KL divergence, summed over latent dimensions, is divided by the number of input
values so that both terms are per value. With kl_weight = 1 this is the negative ELBO of a Gaussian decoder
with variance 1/2 (up to constants); smaller weights trade the prior for sharper reconstructions.
At scoring time the mean code mu is decoded (no sampling, so scores are deterministic) and the map is the
reconstruction error of that mean decoding, exactly as for the plain autoencoder.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import register_detector, store_params
from ._reconstruction import (ConvDecoder, ConvEncoder, ReconstructionDetector, dcgan_init, reconstruction_loss,
                              train_epochs)


class VAENet(nn.Module):
    def __init__(self, size: int, latent: int, base: int, cap: int):
        super().__init__()
        self.latent = latent
        self.encoder = ConvEncoder(size, 2 * latent, base, cap)   # mean and log-variance
        self.decoder = ConvDecoder(size, latent, base, cap)
        dcgan_init(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).split(self.latent, dim=1)
        return mu, logvar.clamp(-10, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled reconstruction, mu and logvar (training); use `decoder(encode(x)[0])` to score."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


@register_detector("vae", family="reconstruction",
                   summary="A variational autoencoder baseline: flags what it redraws poorly; trains for minutes.")
class VariationalAutoEncoder(ReconstructionDetector):
    """Convolutional VAE.

    Parameters
    ----------
    kl_weight : weight of the per-value KL term (1 = the ELBO of a variance-1/2 Gaussian decoder).
    Others : as :class:`.ae.AutoEncoder`; `latent_dim` is the dimension of z.
    """

    def __init__(self, resize: int = 128, crop: int | None = None, latent_dim: int = 128, base_channels: int = 32,
                 max_channels: int = 256, epochs: int = 40, batch_size: int = 16, lr: float = 1e-3,
                 kl_weight: float = 1.0, ssim_weight: float = 0.0, blur_sigma: float = 4.0, score_topk: float = 0.01,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        super()._validate()
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    def _build(self) -> nn.Module:
        return VAENet(self.preprocess.input_size, self.latent_dim, self.base_channels, self.max_channels)

    def _reconstruct(self, net: VAENet, x: torch.Tensor) -> torch.Tensor:
        return net.decoder(net.encode(x)[0])

    def _train(self, net, data, device, progress):
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        net.train()

        def step(x):
            recon, mu, logvar = net(x)
            rec_loss, parts = reconstruction_loss(x, recon, self.ssim_weight)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(dim=1).mean() / x[0].numel()
            loss = rec_loss + self.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item(), **parts, "kl": kl.item()}
        return train_epochs(step, data, self.epochs, self.batch_size, device, progress)

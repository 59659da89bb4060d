"""GANomaly (Akcay, Atapour-Abarghouei & Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
Adversarial Training", ACCV 2018).

Generator = encoder G_E -> decoder G_D -> encoder E: an image x is coded as z = G_E(x), rebuilt as
x' = G_D(z), and the rebuilt image is coded again as z' = E(x'). A DCGAN discriminator D (the same encoder
pyramid with a one-unit sigmoid head) judges x against x'. The generator minimises

    w_adv * ||f(x) - f(x')||^2  +  w_con * |x - x'|_1  +  w_enc * ||z - z'||^2

with f the discriminator's last feature map (feature matching), weights 1, 50 and 1 as in the paper; D
minimises binary cross-entropy, and is re-initialised when its loss collapses below 1e-5 (as in the authors'
code). Both use Adam with lr 2e-4 and betas (0.5, 0.999). Follows the paper and anomalib's
``models/image/ganomaly`` (which reports 42.1 image AUROC on MVTec AD: a weak baseline).

Image score: the distance between the two latent codes. `latent_score="paper"` is the paper's
A(x) = mean((z - z')^2). The default, `"standardized"`, first centres and scales every dimension of the
difference z - z' by its mean and standard deviation over the training images (fitted after training), i.e. a
diagonal Mahalanobis distance of the difference from its normal behaviour: the raw difference is dominated by a
few high-variance dimensions. Measured on the same trained models (15 epochs, 128 px): image AUROC 0.860 ->
0.928 on bottle and 0.559 -> 0.603 on magnetic_tile.
Anomaly map: GANomaly has no native localisation. The map returned is the generator's per-pixel
reconstruction error |x - x'| (L2 over RGB, blurred, as for the autoencoders), multiplied by one constant
fitted on the training set so that the mean of the training maps' maxima equals the mean training score. The
map is for display and pixel metrics only: the image score does NOT use it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import register_detector, store_params
from ._reconstruction import (ConvDecoder, ConvEncoder, ReconstructionDetector, dcgan_init, error_map,
                              train_epochs)


class GanomalyGenerator(nn.Module):
    def __init__(self, size: int, latent: int, base: int, cap: int):
        super().__init__()
        self.encoder1 = ConvEncoder(size, latent, base, cap)
        self.decoder = ConvDecoder(size, latent, base, cap)
        self.encoder2 = ConvEncoder(size, latent, base, cap)
        # Per-dimension centre and scale of z - z' on the training set (identity until fitted).
        self.register_buffer("diff_mean", torch.zeros(latent))
        self.register_buffer("diff_std", torch.ones(latent))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction x', latent z = G_E(x) and latent z' = E(x')."""
        z = self.encoder1(x)
        fake = self.decoder(z)
        return fake, z, self.encoder2(fake)


class GanomalyNet(nn.Module):
    def __init__(self, size: int, latent: int, base: int, cap: int):
        super().__init__()
        self.generator = GanomalyGenerator(size, latent, base, cap)
        self.discriminator = ConvEncoder(size, 1, base, cap)   # features -> head (one logit)
        dcgan_init(self)

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) real/fake logits and the last feature map used for feature matching."""
        features = self.discriminator.features(x)
        return self.discriminator.head(features).flatten(), features


@register_detector("ganomaly", family="reconstruction", summary=(
                   "A GAN-style encoder-decoder-encoder baseline for comparison; trains for minutes, usually "
                   "weaker."))
class Ganomaly(ReconstructionDetector):
    """GANomaly.

    Parameters
    ----------
    latent_dim : size of z (paper: 100).
    lr, beta1 : Adam learning rate and first beta for both networks (paper: 2e-4, 0.5; second beta 0.999).
    w_adv, w_con, w_enc : loss weights (paper: 1, 50, 1).
    latent_score : "standardized" (default) or "paper": how the latent difference becomes the score (see above).
    ssim_weight, blur_sigma, score_topk : shape the display map only (the score is the latent distance).
    Others : as :class:`.ae.AutoEncoder`.
    """

    def __init__(self, resize: int = 128, crop: int | None = None, latent_dim: int = 100, base_channels: int = 32,
                 max_channels: int = 256, epochs: int = 15, batch_size: int = 16, lr: float = 2e-4,
                 beta1: float = 0.5, w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0,
                 latent_score: str = "standardized", ssim_weight: float = 0.0, blur_sigma: float = 4.0,
                 score_topk: float = 0.01, calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        super()._validate()
        if self.latent_score not in ("standardized", "paper"):
            raise ValueError(f"latent_score must be 'standardized' or 'paper', got {self.latent_score!r}")

    def _build(self) -> nn.Module:
        return GanomalyNet(self.preprocess.input_size, self.latent_dim, self.base_channels, self.max_channels)

    def _scoring_modules(self, net: GanomalyNet) -> nn.Module:
        return net.generator  # the discriminator is only needed for training and is not saved

    def _reconstruct(self, net: GanomalyNet, x: torch.Tensor) -> torch.Tensor:
        return net.generator(x)[0]

    def _train(self, net, data, device, progress):
        betas = (self.beta1, 0.999)
        opt_g = torch.optim.Adam(net.generator.parameters(), lr=self.lr, betas=betas)
        opt_d = torch.optim.Adam(net.discriminator.parameters(), lr=self.lr, betas=betas)
        net.train()
        resets = 0

        def step(x):
            nonlocal resets
            fake, z, z2 = net.generator(x)
            # Generator: feature matching against the real batch, contextual L1, latent L2.
            with torch.no_grad():
                _, real_features = net.discriminate(x)
            _, fake_features = net.discriminate(fake)
            adv = F.mse_loss(fake_features, real_features)
            con = F.l1_loss(fake, x)
            enc = F.mse_loss(z2, z)
            loss_g = self.w_adv * adv + self.w_con * con + self.w_enc * enc
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            # Discriminator: real -> 1, reconstruction -> 0.
            real_logit, _ = net.discriminate(x)
            fake_logit, _ = net.discriminate(fake.detach())
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            if loss_d.item() < 1e-5:
                dcgan_init(net.discriminator)
                resets += 1
            return {"loss": loss_g.item(), "adv": adv.item(), "con": con.item(), "enc": enc.item(),
                    "loss_d": loss_d.item()}
        history = train_epochs(step, data, self.epochs, self.batch_size, device, progress)
        history[-1]["discriminator_resets"] = resets
        return history

    def _latent_scores(self, net: GanomalyNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) scores and the reconstructions."""
        g = net.generator
        fake, z, z2 = g(x)
        diff = (z - z2).flatten(1)
        if self.latent_score == "standardized":
            diff = (diff - g.diff_mean) / g.diff_std
        return diff.pow(2).mean(dim=1), fake

    @torch.no_grad()
    def _calibrate(self, net, data, device) -> dict:
        """After training: the latent standardisation, then the map scale (mean training score / mean training map
        maximum: one constant, never per image)."""
        diffs, peaks = [], []
        for start in range(0, len(data), self.batch_size):
            x = data[start:start + self.batch_size].to(device)
            fake, z, z2 = net.generator(x)
            diffs.append((z - z2).flatten(1))
            peaks.append(error_map(x, fake, self.ssim_weight, self.blur_sigma).flatten(1).max(dim=1).values)
        diffs = torch.cat(diffs)
        if self.latent_score == "standardized":
            net.generator.diff_mean.copy_(diffs.mean(dim=0))
            net.generator.diff_std.copy_(diffs.std(dim=0).clamp_min(1e-6))
            diffs = (diffs - net.generator.diff_mean) / net.generator.diff_std
        peak = torch.cat(peaks).mean().item()
        return {"map_scale": diffs.pow(2).mean(dim=1).mean().item() / peak if peak > 0 else 1.0}

    def _scores_and_maps(self, net, x):
        scores, fake = self._latent_scores(net, x)
        maps = error_map(x, fake, self.ssim_weight, self.blur_sigma) * self.train_info_["map_scale"]
        return scores, maps

    def _map_description(self) -> str:
        ssim = f" + {self.ssim_weight} * (1 - SSIM)" if self.ssim_weight > 0 else ""
        return (f"generator reconstruction error (L2 over RGB{ssim}), Gaussian blur sigma {self.blur_sigma} px, times "
                f"map_scale {self.train_info_['map_scale']:.4g} fitted on the training set; for display only: the "
                f"image score is the latent distance (latent_score={self.latent_score!r}), not taken from the map")

"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing
Flows", 2021; gathierry/FastFlow is the reference code this follows).

A frozen backbone gives feature maps at three strides; each goes through a trainable LayerNorm over
[C, H, W] and a 2D normalizing flow of affine coupling steps, trained to map normal features to a standard
normal. Positions whose latent z is unlikely are anomalous. The coupling steps are written here in plain
torch, mirroring FrEIA's AllInOneBlock as the reference uses it (soft-clamped affine coupling, a learned
per-channel global scale and offset, then a fixed random channel permutation).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import DEFAULT_BACKBONE
from ..data import image_batches
from .base import BackboneDetector, Progress, register_detector, resolve_device, SeededTraining, store_params
from .ops import upsample_blur


class AffineCouplingStep(nn.Module):
    """One flow step on (N, C, H, W): affine coupling, global affine, fixed channel permutation.

    The first C // 2 channels pass unchanged and condition a conv-ReLU-conv subnet ('same' padding) that
    gives a log-scale s and a shift t for the other channels: y2 = x2 * exp(s) + t with
    s = clamp * tanh(0.1 * a) (FrEIA's soft clamp). Then every channel is scaled by a learned positive
    factor (0.1 * softplus with beta 0.5, initialised to 1), shifted, and the channels are permuted.
    `forward` returns (y, log|det J|) per sample; `inverse` undoes it exactly.
    """

    def __init__(self, channels: int, hidden: int, kernel: int, clamp: float, generator: torch.Generator):
        super().__init__()
        self.split = channels // 2
        self.clamp = clamp
        rest = channels - self.split
        self.subnet = nn.Sequential(nn.Conv2d(self.split, hidden, kernel, padding=kernel // 2), nn.ReLU(),
                                    nn.Conv2d(hidden, 2 * rest, kernel, padding=kernel // 2))
        # softplus_{beta=0.5}(p) * 0.1 == 1 at p = 2 log(exp(5) - 1).
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), 2.0 * math.log(math.exp(5.0) - 1.0)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("perm", torch.randperm(channels, generator=generator))
        self.register_buffer("inv_perm", torch.argsort(self.perm))

    def _scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coupling(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = 0.1 * self.subnet(x1)
        rest = a.shape[1] // 2
        return self.clamp * torch.tanh(a[:, :rest]), a[:, rest:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        s, t = self._coupling(x1)
        y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        scale = self._scale()
        y = (y * scale + self.global_offset)[:, self.perm]
        log_det = s.sum(dim=(1, 2, 3)) + torch.log(scale).sum() * x.shape[2] * x.shape[3]
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = (y[:, self.inv_perm] - self.global_offset) / self._scale()
        y1, y2 = y[:, :self.split], y[:, self.split:]
        s, t = self._coupling(y1)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)


class Flow2d(nn.Module):
    """A stack of coupling steps; 3x3 subnets only, or alternating 3x3 and 1x1 (`conv3x3_only=False`)."""

    def __init__(self, channels: int, steps: int, hidden_ratio: float, clamp: float, conv3x3_only: bool,
                 generator: torch.Generator):
        super().__init__()
        hidden = max(1, int(round(channels * hidden_ratio)))
        self.steps = nn.ModuleList(
            AffineCouplingStep(channels, hidden, 3 if conv3x3_only or i % 2 == 0 else 1, clamp, generator)
            for i in range(steps))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, ld = step(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


class FastFlowHead(nn.Module):
    """Per stage: LayerNorm over [C, H, W], then a 2D flow. Pure torch: no optimiser, no threshold.

    The LayerNorm has no learned scale and shift (the reference learns them). Its Jacobian is not in the
    loss, so a learned scale can shrink the flow's input and lower the NLL without bound. On magnetic tile
    that collapse took stage 3's validation NLL from -55k to -142k within eight epochs while its image AUROC
    fell from 0.92 to 0.59. Without the affine the NLL converges and the best validation epoch is a good one.
    """

    def __init__(self, channels: Sequence[int], grids: Sequence[tuple[int, int]], steps: int, hidden_ratio: float,
                 clamp: float, conv3x3_only: bool, seed: int, norm_affine: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.norms = nn.ModuleList(nn.LayerNorm([c, *g], elementwise_affine=norm_affine)
                                   for c, g in zip(channels, grids))
        self.flows = nn.ModuleList(Flow2d(c, steps, hidden_ratio, clamp, conv3x3_only, gen) for c in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stage (z, log|det J|); z has the feature map's shape, log-det one value per sample."""
        return [flow(norm(f)) for f, norm, flow in zip(features, self.norms, self.flows)]


def flow_nll(outputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(N,) per-sample loss, summed over stages: 0.5 * sum(z^2) - log|det J| (the reference's loss)."""
    return sum(0.5 * z.pow(2).sum(dim=(1, 2, 3)) - log_det for z, log_det in outputs)


def split_validation(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) index tensors; validation holds round(fraction * n) images, at least 1 if n >= 2."""
    n_val = min(n - 1, max(1 if n >= 2 and fraction > 0 else 0, int(round(fraction * n))))
    order = torch.randperm(n, generator=generator)
    return order[n_val:].sort().values, order[:n_val].sort().values


@register_detector("fastflow", family="representation", summary=(
                   "Learns the distribution of good images' features with normalizing flows and flags unlikely "
                   "regions; trains for a few minutes."))
class FastFlow(SeededTraining, BackboneDetector):
    """FastFlow anomaly detector: 2D normalizing flows over frozen backbone features.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
        Default: EfficientNet-Lite0 stages 2, 3, 4 (strides 8, 16, 32; 40, 112, 320 channels). The paper's
        strides 4, 8, 16 suit ResNet18; Lite0's stride-4 stage is too shallow (24 channels): on magnetic
        tile stages 1-3 reached image AUROC 0.74 where 2-4 reach 0.97, with bottle at 0.999 for both.
    resize : the longer side of the input, the training images' aspect ratio kept ("auto", or (h, w) for an
        exact frame; see PatchCore).
    crop : centre crop after resizing; None (default) keeps the whole image: a centre crop hides defects at
        the border, as on magnetic tile's narrow tiles.
    flow_steps : affine coupling steps per stage (paper: 8).
    hidden_ratio : subnet hidden channels as a multiple of the stage's channels (reference, ResNet18: 1.0).
    clamp : soft clamp of the coupling log-scales (paper: 2.0).
    conv3x3_only : 3x3 subnets in every step (reference for ResNet18); False alternates 3x3 and 1x1.
    epochs : passes over the training images; each stage keeps its flow from its best validation epoch.
    batch_size : images per optimiser step.
    lr, weight_decay : Adam (paper: 1e-3 and 1e-5).
    val_fraction : share of the normal training images held out to pick the best epoch by their NLL.
    blur_sigma : Gaussian blur of the final map (0 = none; the reference uses none).
    seed : initialisation, permutations, validation split and batch order.

    Attributes
    ----------
    head_ : FastFlowHead, the LayerNorms and each stage's flow from its best validation epoch.
    grids_ : feature grid (h, w) per stage.
    history_ : per epoch, mean training and validation NLL per image.
    best_epoch_ : per stage, the 1-based epoch whose flow weights were kept.

    Notes
    -----
    The map is 1 - mean over stages of upsample(exp(-0.5 * mean_c z^2)): the reference's
    -exp(...) shifted by +1 so that maps lie in [0, 1) with 0 = perfectly normal. The image score is the
    maximum of the map, so image scores and pixel maps share one scale.
    """

    cross_fit = False    # a trained network: five more trainings would be too dear

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (2, 3, 4), weights: str | None = None,
                 resize: int | str | tuple = 256, crop: int | None = None, flow_steps: int = 8, hidden_ratio: float = 1.0,
                 clamp: float = 2.0, conv3x3_only: bool = True, epochs: int = 20, batch_size: int = 8,
                 lr: float = 1e-3, weight_decay: float = 1e-5, val_fraction: float = 0.1, blur_sigma: float = 4.0,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        self._require_stages()
        self._require_positive("flow_steps", "epochs", "batch_size")
        if self.hidden_ratio <= 0 or self.clamp <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("hidden_ratio, clamp and lr must be > 0 and weight_decay >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def _make_head(self, grids: Sequence[tuple[int, int]], norm_affine: bool = False) -> FastFlowHead:
        return FastFlowHead(self.feature_extractor().channels, grids, int(self.flow_steps), float(self.hidden_ratio),
                            float(self.clamp), bool(self.conv3x3_only), int(self.seed), norm_affine)

    def _features(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> list[torch.Tensor]:
        """Per stage, the frozen features of all images (N, C, h, w), on the detector's device."""
        parts: list[list[torch.Tensor]] = []
        for start, batch in image_batches(images, batch_size):
            feats = self.backbone_features(self.preprocess.images_to_tensor(batch))
            parts.append([f.float() for f in feats])
            progress("features", start + len(batch), len(images))
        return [torch.cat(stage) for stage in zip(*parts)]

    def _train(self, images: Sequence[np.ndarray], progress: Progress, dev: torch.device) -> None:
        gen = torch.Generator().manual_seed(int(self.seed))
        feats = self._features(images, progress)
        self.grids_ = [tuple(f.shape[-2:]) for f in feats]
        head = self._make_head(self.grids_).to(dev)
        train_idx, val_idx = split_validation(len(images), float(self.val_fraction), gen)
        opt = torch.optim.Adam(head.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        bs = int(self.batch_size)
        n_stages = len(feats)
        # The stages' flows share no parameters, so each keeps its own best epoch.
        best = [math.inf] * n_stages
        best_flows: list = [None] * n_stages
        val_feats = [f[val_idx.to(dev)] for f in feats]  # indexed once, not every epoch
        self.best_epoch_ = [0] * n_stages
        history = []
        for epoch in range(int(self.epochs)):
            head.train()
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            total = 0.0
            for start in range(0, len(order), bs):
                idx = order[start:start + bs].to(dev)
                loss = flow_nll(head([f[idx] for f in feats])).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            record = {"epoch": epoch + 1, "train_nll": total / len(order)}
            if len(val_idx):
                per_stage = self._mean_nll(head, val_feats)
                record["val_nll"], record["val_nll_stages"] = sum(per_stage), per_stage
            history.append(record)
            # Selection by validation NLL; by training NLL (all stages together) when nothing is held out.
            criteria = record.get("val_nll_stages", [record["train_nll"]] * n_stages)
            for k, value in enumerate(criteria):
                if value < best[k]:
                    best[k], self.best_epoch_[k] = value, epoch + 1
                    best_flows[k] = copy.deepcopy(head.flows[k].state_dict())
            progress("epoch", epoch + 1, int(self.epochs))
        for flow, state in zip(head.flows, best_flows):
            flow.load_state_dict(state)
        self.head_ = head.eval()
        self.history_ = history

    @staticmethod
    @torch.no_grad()
    def _mean_nll(head: FastFlowHead, feats: list[torch.Tensor], batch_size: int = 16) -> list[float]:
        """Per stage, the mean NLL per image of `feats`."""
        head.eval()
        n = feats[0].shape[0]
        totals = [0.0] * len(feats)
        for s in range(0, n, batch_size):
            for k, out in enumerate(head([f[s:s + batch_size] for f in feats])):
                totals[k] += float(flow_nll([out]).sum())
        return [t / n for t in totals]

    def score_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [f.float() for f in self.backbone_features(x)]
        size = tuple(x.shape[-2:])
        prob = 0
        for z, _ in self.head_(feats):
            p = torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
            prob = prob + F.interpolate(p, size=size, mode="bilinear", align_corners=False)[:, 0]
        maps = 1.0 - prob.cpu() / len(feats)
        if self.blur_sigma > 0:
            maps = upsample_blur(maps, size, float(self.blur_sigma))
        return maps.flatten(1).max(1).values, maps

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": v for k, v in self.head_.state_dict().items()}

    def _fitted_json(self) -> dict:
        return {"grids": [list(g) for g in self.grids_], "history": self.history_, "best_epoch": self.best_epoch_}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.grids_ = [tuple(g) for g in fitted["grids"]]
        self.history_ = fitted["history"]
        self.best_epoch_ = fitted["best_epoch"]
        # Models saved before the LayerNorms lost their affine still carry it: keep scoring them as trained.
        head = self._make_head(self.grids_, norm_affine=any(k.startswith("head.norms.") for k in tensors))
        head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
        self.head_ = head.to(resolve_device(self.device)).eval()

    def _card_extra(self) -> dict:
        n_params = sum(p.numel() for p in self.head_.parameters())
        return {"backbone": {"frozen": True},
                "flows": {"steps_per_stage": int(self.flow_steps), "grids": [list(g) for g in self.grids_],
                          "subnet": "conv3x3-ReLU-conv3x3" if self.conv3x3_only else "alternating 3x3 / 1x1",
                          "trainable_parameters": int(n_params)},
                "training": {"epochs": int(self.epochs), "best_epoch": self.best_epoch_,
                             "selected_by": "validation NLL" if any("val_nll" in h for h in self.history_)
                             else "training NLL (no validation split)",
                             "history": self.history_},
                "score": "map = 1 - mean over stages of upsampled exp(-0.5 mean_c z^2) (the reference's -exp(.) "
                         "shifted by +1), Gaussian blur; image = max of map"}

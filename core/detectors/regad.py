"""RegAD (Huang et al., "Registration based Few-Shot Anomaly Detection", ECCV 2022; reference code
MediaBrain-SJTU/RegAD).

A new product variant often has only a handful of good images. RegAD learns, once and on OTHER categories,
to register features: a spatial transformer after each backbone stage turns the stage's feature map into a
canonical pose, trained with a siamese loss so that two good images of the same category agree position by
position after registration. On a new category nothing is trained: the few support images are augmented
(the paper's rotations, translations, flip, grey and quarter turns), registered, and a Gaussian per position
is fitted on the registered features (as PaDiM); a test image scores its Mahalanobis distance per position.

Built as the paper except:
- the backbone is EfficientNet-Lite0 (the offline weights; no ResNet18 here), and it stays frozen: only the
  transformers and the siamese predictor train, which keeps the training to minutes on a CPU;
- each transformer predicts a rotation only, in pixel space so that non-square maps rotate without shear, and
  samples with reflected borders: with a scale as well (the paper's default "rotation_scale" mode) every
  trained transformer zoomed to the end of its range, a shortcut to agreement (zoomed out, the padding
  agrees; zoomed in, smooth regions do), and with zero padding it zoomed out;
- training pairs are rotated at random (up to ROTATION_RANGE) so that the registration has poses to undo, and
  half the pairs are one image in two poses (with few training categories, two different images alone
  taught the transformers one fixed pose for every input).

`train_registration` learns the transformers from categories of normal images (`python -m core
regad-train`); `registration` names the saved file. Without one (`registration=None`) the transformers are
the identity: the support augmentation and Gaussians alone, the paper's ablation without registration.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbones import DEFAULT_BACKBONE, FeatureExtractor
from ..data import Preprocess, image_batches
from ..files import replacing
from .base import BackboneDetector, Progress, no_progress, register_detector, resolve_device, seeded, store_params
from .ops import upsample_blur
from .padim import (check_gaussian_params, from_lower_triangle, lower_triangle, mahalanobis, position_gaussians,
                    random_channels, stage_embedding)

# The paper's support augmentation: small rotations (radians), translations (shares of the side), quarter turns.
SUPPORT_ANGLES = tuple(math.pi * a for a in (-1 / 4, -3 / 16, -1 / 8, -1 / 16, 1 / 16, 1 / 8, 3 / 16, 1 / 4))
SUPPORT_SHIFTS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
# Registration training: pairs rotated by up to this many radians either way.
ROTATION_RANGE = math.pi / 4


def rotation_theta(angle: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, 2, 3) affine_grid matrices that rotate by `angle` (radians) in pixel space about the
    centre of an h x w map (normalised coordinates stretch a non-square map: rotating them would shear)."""
    h, w = hw
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin * h / w, zero], -1),
                        torch.stack([sin * w / h, cos, zero], -1)], 1)


def warp(x: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode=padding, align_corners=False)


class RotationSTN(nn.Module):
    """A spatial transformer on a feature map: a small localisation net predicts a rotation; it starts as the
    identity (last layer zero)."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.localise = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * hidden, hidden),
                                      nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.localise[-1].weight)
        nn.init.zeros_(self.localise[-1].bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(N, 2, 3) affine_grid matrices: where each registered position samples the map."""
        angle = math.pi * torch.tanh(self.localise(f)[:, 0])
        return rotation_theta(angle, tuple(f.shape[-2:]))


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    return torch.cat([theta, theta.new_tensor([0.0, 0.0, 1.0]).expand(len(theta), 1, 3)], 1)


class RegistrationNet(nn.Module):
    """The frozen backbone with a transformer after each chosen stage: each stage's registered map feeds the
    next stage, as in the paper."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor
        self.transformers = nn.ModuleList(RotationSTN(c) for c in extractor.channels)
        model = extractor.model
        # timm's EfficientNetFeatures: block i's output is stage _stage_out_idx[i + 1].
        self._after_block = {block - 1: k for k, block in enumerate(sorted(model._stage_out_idx))}

    def registered(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each chosen stage's registered map, and its transform (N, 2, 3) relative to the stage's input."""
        model = self.extractor.model
        x = model.bn1(model.conv_stem(x))
        maps, thetas = [], []
        for i, block in enumerate(model.blocks):
            if len(maps) == len(self.transformers):
                break
            x = block(x)
            if i in self._after_block:
                thetas.append(self.transformers[self._after_block[i]](x))
                x = warp(x, thetas[-1], padding="reflection")
                maps.append(x)
        return maps, thetas

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The stage maps all in the first stage's registered frame (a later stage's own transforms undone, so
        that one position means one place in every stage), and the first transform (N, 2, 3), which takes
        that frame back to the image."""
        maps, thetas = self.registered(x)
        aligned, since_first = [maps[0]], torch.eye(3, device=x.device).expand(len(x), 3, 3)
        for f, theta in zip(maps[1:], thetas[1:]):
            since_first = since_first @ _homogeneous(theta)
            aligned.append(warp(f, torch.linalg.inv(since_first)[:, :2]))
        return aligned, thetas[0]


def registration_tensors(net: RegistrationNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.transformers.state_dict().items()}


def train_registration(categories: dict[str, Sequence[np.ndarray]], out: str | Path,
                       backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2, 3), size: int = 224,
                       steps: int = 300, batch_pairs: int = 8, lr: float = 1e-3, seed: int = 0,
                       progress: Progress = no_progress, log: Callable[[str], None] = print) -> Path:
    """Train the transformers on pairs of normal images from the same category (several categories, none of
    them the target) and save them as safetensors with a JSON header naming backbone, stages and sources.

    The paper's siamese loss: a predictor head p on the last stage, loss = -(cos(p(z1), z2) + cos(p(z2), z1))
    / 2 per position, the targets z detached (SimSiam's stop-gradient, which keeps it from collapsing)."""
    categories = {name: images for name, images in categories.items() if len(images) >= 2}
    if not categories:
        raise ValueError("registration training needs at least one category with 2 or more normal images")
    with seeded(seed, torch.device("cpu")):
        rng = np.random.default_rng(seed)
        extractor = FeatureExtractor(backbone, tuple(stages))
        net = RegistrationNet(extractor)
        last = extractor.channels[-1]
        predictor = nn.Sequential(nn.Conv2d(last, last // 2, 1), nn.BatchNorm2d(last // 2), nn.ReLU(),
                                  nn.Conv2d(last // 2, last, 1))
        optimiser = torch.optim.Adam([*net.transformers.parameters(), *predictor.parameters()], lr=lr)
        preprocess = Preprocess(resize=(size, size), crop=None, mean=extractor.mean, std=extractor.std)
        names = sorted(categories)
        losses = []
        for step in range(steps):
            name = names[rng.integers(len(names))]
            # Half the pairs are one image in two poses: a pose difference the transformers can always undo.
            pairs = [rng.choice(len(categories[name]), 2, replace=False) if rng.random() < 0.5 else
                     [rng.integers(len(categories[name]))] * 2 for _ in range(batch_pairs)]
            x = preprocess.images_to_tensor([categories[name][int(i)] for pair in pairs for i in pair])
            angles = torch.from_numpy(rng.uniform(-ROTATION_RANGE, ROTATION_RANGE, len(x))).float()
            x = warp(x, rotation_theta(angles, (size, size)), padding="reflection")
            z = net.registered(x)[0][-1]
            p = predictor(z)
            z1, z2, p1, p2 = z[0::2], z[1::2], p[0::2], p[1::2]
            loss = -(F.cosine_similarity(p1, z2.detach(), dim=1).mean()
                     + F.cosine_similarity(p2, z1.detach(), dim=1).mean()) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            progress("registration", step + 1, steps)
            if (step + 1) % 50 == 0:
                log(f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"backbone": backbone, "stages": json.dumps(list(stages)), "size": str(size), "steps": str(steps),
              "seed": str(seed), "categories": json.dumps({n: len(v) for n, v in categories.items()}),
              "final_loss": f"{np.mean(losses[-50:]):.4f}"}
    with replacing(out) as tmp:
        save_file(registration_tensors(net), tmp, metadata=header)
    return out


def augment_support(x: torch.Tensor) -> torch.Tensor:
    """The paper's support augmentation of a preprocessed batch (N, 3, H, W): the originals, 8 small
    rotations, 4 translations, a horizontal flip, grey, and the quarter turns (90 and 270 degrees only where
    the frame is square): 18 images per shot on a square frame."""
    h, w = x.shape[-2:]
    n = len(x)
    out = [x]
    for angle in SUPPORT_ANGLES:
        out.append(warp(x, rotation_theta(torch.full((n,), angle), (h, w))))
    for dx, dy in SUPPORT_SHIFTS:
        theta = torch.tensor([[1.0, 0.0, 2 * dx], [0.0, 1.0, 2 * dy]]).expand(n, 2, 3)
        out.append(warp(x, theta))
    out.append(x.flip(-1))
    out.append(x.mean(1, keepdim=True).expand_as(x))
    for k in ((1, 2, 3) if h == w else (2,)):
        out.append(torch.rot90(x, k, dims=(-2, -1)))
    return torch.cat(out)


@register_detector("regad", family="representation", summary=(
                   "Starts a new product from 2 to 8 good images, using a registration learnt on other "
                   "products."))
class RegAD(BackboneDetector):
    """RegAD few-shot anomaly detector: registered features of an augmented support set, a Gaussian per
    position (see the module docstring).

    Parameters
    ----------
    registration : path of a registration file from `train_registration` (trained on other categories), or
        None for identity transformers (no registration).
    backbone, stages, weights : as PaDiM; must match the registration file's.
    resize : the longer side of the input, aspect ratio kept (paper: 224 square); "auto" or (h, w) as PaDiM.
    crop : centre crop after resizing; None keeps the whole image.
    augment : augment the support set as the paper (True) or use the images as they are.
    n_features : random channel subset of the concatenated stages for the Gaussians (None keeps all).
    epsilon : ridge added to every covariance (paper: 0.01 I).
    blur_sigma : Gaussian blur of the upsampled distance map (paper: 4).

    Attributes
    ----------
    registration_ : the transformers' weights (saved with the model, so a model folder stands alone).
    channel_idx_, mean_, precision_, grid_ : as PaDiM.
    """

    few_shot = True

    def __init__(self, registration: str | None = None, backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2, 3),
                 weights: str | None = None, resize: int | str | tuple = 224, crop: int | None = None,
                 augment: bool = True, n_features: int | None = 100, epsilon: float = 0.01, blur_sigma: float = 4.0,
                 calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        self._require_stages()
        check_gaussian_params(self.n_features, self.epsilon)

    def _registered(self) -> RegistrationNet:
        if getattr(self, "_net", None) is None:
            net = RegistrationNet(self.feature_extractor())
            net.transformers.load_state_dict(self.registration_)
            self._net = net.eval().requires_grad_(False).to(resolve_device(self.device))
        return self._net

    def _load_registration(self) -> dict[str, torch.Tensor]:
        identity = registration_tensors(RegistrationNet(self.feature_extractor()))
        if self.registration is None:
            return identity
        path = Path(self.registration)
        if not path.is_file():
            raise ValueError(f"registration file {path} does not exist: train one with `python -m core "
                             "regad-train` on other categories, or use registration=None")
        tensors = load_file(path)
        if tensors.keys() != identity.keys() or any(tensors[k].shape != identity[k].shape for k in tensors):
            raise ValueError(f"registration file {path} was trained for another backbone or stages than "
                             f"{self.backbone} {tuple(self.stages)}")
        return tensors

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d, h, w) registered, reduced embeddings of a preprocessed batch, and the transforms (N, 2, 3)
        from their frame back to the image's."""
        maps, theta = self._registered()(x.to(resolve_device(self.device)))
        emb = stage_embedding(maps).float()
        return emb.index_select(1, self.channel_idx_.to(emb.device)), theta

    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        self.registration_ = self._load_registration()
        self._net = None
        self.channel_idx_ = random_channels(sum(self.feature_extractor().channels), self.n_features, self.seed)

        def embeddings():
            for start, batch in image_batches(images, batch_size):
                x = self.preprocess.images_to_tensor(batch)
                with torch.no_grad():
                    yield self.embed(augment_support(x) if self.augment else x)[0]
                progress("support features", start + len(batch), len(images))

        self.mean_, self.precision_, self.grid_ = position_gaussians(embeddings(), self.epsilon,
                                                                     resolve_device(self.device))
        progress("gaussians", 1, 1)

    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        dev = resolve_device(self.device)
        emb, theta = self.embed(x)
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), self.mean_.to(dev), self.precision_.to(dev))
        # Back from the registered frame to the image's: the inverse of the first stage's transform.
        grid = warp(dist.reshape(len(x), 1, *self.grid_), torch.linalg.inv(_homogeneous(theta))[:, :2],
                    padding="border")[:, 0].cpu()
        maps = upsample_blur(grid, tuple(x.shape[-2:]), self.blur_sigma)
        return maps.flatten(1).max(1).values.numpy(), maps.numpy().astype(np.float32)

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"channel_idx": self.channel_idx_, "mean": self.mean_, "precision_lower": lower_triangle(self.precision_),
                **{f"registration.{k}": v for k, v in self.registration_.items()}}

    def _fitted_json(self) -> dict:
        return {"grid": list(self.grid_)}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.channel_idx_, self.mean_ = tensors["channel_idx"], tensors["mean"]
        self.precision_ = from_lower_triangle(tensors["precision_lower"], self.mean_.shape[1])
        self.registration_ = {k[len("registration."):]: v for k, v in tensors.items() if k.startswith("registration.")}
        self.grid_ = tuple(fitted["grid"])
        self._net = None

    def _card_extra(self) -> dict:
        return {"backbone": {"note": "the paper trains a ResNet18 with its transformers; here EfficientNet-Lite0 "
                                     "stays frozen and only the transformers were trained"},
                "registration": self.registration or "none (identity transformers)",
                "support": {"augmented": self.augment, "per_shot": 18 if self.augment else 1},
                "gaussians": {"grid": list(self.grid_), "dim": int(self.mean_.shape[1]),
                              "covariance_ridge": self.epsilon},
                "score": "Mahalanobis distance per position on registered features, upsampled and blurred; "
                         "image = max of map"}

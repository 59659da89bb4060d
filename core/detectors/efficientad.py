"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024; nelson1425/EfficientAD reproduces it and is the reference this follows).

A student patch network (PDN) learns to predict a frozen teacher's features on normal images; where it
fails, the image is anomalous (local anomalies). A small autoencoder predicts the teacher's features
through a 64-d bottleneck, and a second half of the student learns to predict the autoencoder; their
disagreement flags logical (global) anomalies. The final map is the mean of the two maps, each normalised
by quantiles of maps on held-out normal images.

The teacher. The paper's PDN teacher is distilled from WideResNet-101 on ImageNet; neither those
weights nor ImageNet exist here. By default (`teacher="lite"`) the teacher is frozen pretrained
EfficientNet-Lite0 features: stages 1 and 2 (strides 4 and 8, receptive fields about 19 and 67 px,
bracketing the PDN's 33 px), the stride-8 map upsampled to the stride-4 grid, concatenated and
standardised per channel on the training images, exactly as the paper standardises its teacher. The
student and autoencoder keep the paper's architectures (PDN-S with padding, so that its output grid is
the teacher's stride-4 grid), with channel widths scaled by `student_width` so that training fits a
CPU budget.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import DEFAULT_BACKBONE
from .base import BackboneDetector, Progress, register_detector, resolve_device, SeededTraining, store_params
from .fastflow import split_validation
from .ops import upsample_blur

# ITU-R BT.601 luma weights (R, G, B): the grey of the penalty crops and of the colour jitter.
LUMA = (0.299, 0.587, 0.114)
# The paper's penalty batches: random crops of 25% to 100% of the shorter side, this share made grey.
MIN_CROP_SHARE, GREY_SHARE = 0.25, 0.3
FEATURE_BATCH = 16                  # images per pass where nothing is trained (teacher statistics, quantiles)
LR_DROP_AT, LR_DROP = 0.95, 0.1     # the paper: the learning rate x0.1 for the last 5% of the steps
HISTORY_POINTS = 10                 # loss-history entries kept over a fit (the card shows them)
PROGRESS_REPORTS = 100              # progress reports over a fit
# The paper's map normalisation: the validation maps' quantiles qa and qb; a map value at qa becomes 0 and
# at qb NORMALISED_QB, and the student-teacher and autoencoder maps are then averaged.
MAP_QUANTILES = (0.9, 0.995)
NORMALISED_QB = 0.1

# Natural images that ship inside scikit-image (no download): the penalty set standing in for ImageNet.
PENALTY_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                  "immunohistochemistry", "moon", "page", "text", "retina", "colorwheel", "logo", "grass",
                  "gravel", "brick", "clock", "cell")


def pdn_small(out_channels: int, width: float = 1.0, stride: int = 4) -> nn.Sequential:
    """PDN-S with padding: conv4x4 128, ReLU, avgpool 2, conv4x4 256, ReLU, avgpool 2, conv3x3 256, ReLU,
    conv4x4 out; widths scaled by `width`. A 256x256 input gives a 64x64 map (stride 4), receptive field 33.
    stride=8 (for a stride-8 teacher) adds a third 2x2 average pool before the last conv: 32x32 out."""
    if stride not in (4, 8):
        raise ValueError(f"the PDN student supports output strides 4 and 8, not {stride}")
    c1, c2 = max(8, round(128 * width)), max(8, round(256 * width))
    tail = [nn.Conv2d(c2, out_channels, 4)] if stride == 4 else \
        [nn.AvgPool2d(2, 2), nn.Conv2d(c2, out_channels, 4, padding=1)]
    return nn.Sequential(
        nn.Conv2d(3, c1, 4, padding=3), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=1),
        nn.Conv2d(c1, c2, 4, padding=3), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=1),
        nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(inplace=True), *tail)


class AutoEncoder(nn.Module):
    """The paper's autoencoder: six stride-2 convs down to a 64-d code, then bilinear upsampling + conv4x4
    decoder blocks with dropout, ending on the student's output grid. The paper's decoder also visits
    about 2.3x the output grid before resampling down; this one stops at the output grid (4x cheaper)."""

    def __init__(self, out_channels: int, grid: int, width: int = 64, dropout: float = 0.2):
        super().__init__()
        half = max(8, width // 2)
        self.grid = grid
        self.encoder = nn.Sequential(
            nn.Conv2d(3, half, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.ReLU(inplace=True))
        self.code = nn.Conv2d(width, 64, 8)
        self.sizes = [3, 8, max(4, grid // 4), max(4, grid // 2), grid]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64 if i == 0 else width, width, 4, padding=2), nn.ReLU(inplace=True),
                          nn.Dropout(dropout)) for i in range(len(self.sizes)))
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if h.shape[-2:] != (8, 8):  # inputs other than 256 px
            h = F.adaptive_avg_pool2d(h, 8)
        h = self.code(h)
        for size, block in zip(self.sizes, self.blocks):
            h = block(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
        return self.head(F.interpolate(h, size=self.grid, mode="bilinear", align_corners=False))


@lru_cache(maxsize=1)
def penalty_pool() -> tuple[torch.Tensor, ...]:
    """The natural images that ship with scikit-image, as float RGB tensors in [0, 1] (3, H, W).
    Only images bundled with the package are used; one that would need a download is skipped."""
    import skimage.data

    out = []
    for name in PENALTY_IMAGES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - missing from this version, or would need a download
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.dtype != np.uint8:
            img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = img[:, :, :3]
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0)
    if not out:
        raise RuntimeError("no natural images found in skimage.data for the EfficientAD penalty")
    return tuple(out)


def sample_penalty(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: random scaled crops of the natural images, 30% made grey, as the
    paper's ImageNet penalty batches (resize, random crop, random greyscale)."""
    pool = penalty_pool()
    out = []
    for _ in range(n):
        img = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        h, w = img.shape[-2:]
        side = int(min(h, w) * (MIN_CROP_SHARE + (1 - MIN_CROP_SHARE) * float(torch.rand(1, generator=generator))))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        crop = F.interpolate(img[None, :, top:top + side, left:left + side], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0]
        if float(torch.rand(1, generator=generator)) < GREY_SHARE:
            crop = (crop * torch.tensor(LUMA).view(3, 1, 1)).sum(0, keepdim=True).expand(3, -1, -1)
        out.append(crop)
    return torch.stack(out).clamp(0, 1)


def colour_jitter(x01: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Per image, one of brightness, contrast or saturation scaled by a factor in [1 - s, 1 + s] (the paper's
    autoencoder augmentation), on images in [0, 1]."""
    out = []
    grey_w = torch.tensor(LUMA, device=x01.device).view(3, 1, 1)
    for img in x01:
        factor = 1.0 + strength * (2 * float(torch.rand(1, generator=generator)) - 1)
        kind = int(torch.randint(3, (1,), generator=generator))
        grey = (img * grey_w).sum(0, keepdim=True)
        if kind == 0:
            img = img * factor
        elif kind == 1:
            img = (img - grey.mean()) * factor + grey.mean()
        else:
            img = (img - grey) * factor + grey
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the squared differences at or above their `quantile` (the paper's hard feature loss)."""
    d = (teacher - student).pow(2).flatten()
    # The values >= the linearly interpolated quantile are the top n - ceil(q (n - 1)): top-k beats a sort.
    k = max(1, d.numel() - int(math.ceil(quantile * (d.numel() - 1) - 1e-9)))
    return d.topk(k, sorted=False).values.mean()


@register_detector("efficientad", family="representation", summary=(
                   "A small student network learns to imitate a pretrained one on good images and flags where "
                   "it cannot; fast to score, trains for several minutes."))
class EfficientAD(SeededTraining, BackboneDetector):
    """EfficientAD-S anomaly detector: student-teacher plus autoencoder, on a frozen pretrained teacher.

    Parameters
    ----------
    backbone, stages, weights : the teacher: timm name, stages (timm out_indices) and optional weights file.
        Default: EfficientNet-Lite0 stages 1 and 2 (24 + 40 = 64 channels at stride 4). The teacher's
        finest stage sets the grid: stride 4 or 8 (e.g. stages (2, 3)); the student PDN matches it.
    resize, crop : input geometry; the paper uses 256 x 256 with no crop.
    steps : optimiser steps (the paper: 70,000 on a GPU; the default fits a CPU budget).
    batch_size : training images per step (the paper: 1).
    lr, weight_decay : Adam; the learning rate drops 10x for the last 5% of steps. The paper uses 1e-4 over
        70,000 steps; over the default 1,000 CPU steps 1e-4 leaves the student under-trained (measured on
        bottle: image AUROC 0.979 at 1e-4, 0.996 at 1e-3), hence 1e-3 here. Weight decay: 1e-5 as the paper.
    student_width : PDN-S channel widths (128, 256, 256) are scaled by this.
    ae_width : autoencoder channels (paper: 64).
    hard_quantile : the hard feature loss keeps squared differences at or above this quantile (paper: 0.999).
    penalty_size : side of the natural-image penalty crops (the student is fully convolutional).
    val_fraction : normal training images held out to normalise the maps (quantiles 0.9 and 0.995).
    blur_sigma : Gaussian blur of the upsampled map (0 = none, as in the paper).
    seed : initialisation, validation split, image order, penalty crops and colour jitter.

    Attributes
    ----------
    student_ : PDN-S predicting the teacher (first half of its channels) and the autoencoder (second half).
    autoencoder_ : the autoencoder.
    teacher_mean_, teacher_std_ : (1, C, 1, 1) per-channel statistics standardising the teacher.
    quantiles_ : (4,) q_st(0.9), q_st(0.995), q_ae(0.9), q_ae(0.995) of the validation maps.
    history_ : loss values every tenth of training.
    """

    cross_fit = False    # a trained network: five more trainings would be too dear

    square_input = True  # the autoencoder decodes its 1 x 1 bottleneck to a square grid

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2), weights: str | None = None,
                 resize: int = 256, crop: int | None = None, steps: int = 1000, batch_size: int = 1,
                 lr: float = 1e-3, weight_decay: float = 1e-5, student_width: float = 0.25, ae_width: int = 64,
                 hard_quantile: float = 0.999, penalty_size: int = 128, val_fraction: float = 0.1,
                 blur_sigma: float = 0.0, calibration_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        self._require_stages()
        self._require_positive("steps", "batch_size", "ae_width", "penalty_size")
        if self.student_width <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("student_width and lr must be > 0, weight_decay >= 0")
        if not 0 < self.hard_quantile < 1 or not 0 <= self.val_fraction < 1:
            raise ValueError("hard_quantile must be in (0, 1) and val_fraction in [0, 1)")

    # --- networks ---------------------------------------------------------------------------------
    @property
    def _channels(self) -> int:
        return sum(self.feature_extractor().channels)

    def _make_nets(self, grid: int) -> tuple[nn.Module, nn.Module]:
        c = self._channels
        stride = self.preprocess.input_size // grid
        return pdn_small(2 * c, float(self.student_width), stride), AutoEncoder(c, grid, int(self.ae_width))

    def _teacher_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen teacher features on the finest stage's grid, (N, C, g, g)."""
        feats = self.backbone_features(x)
        grid = feats[0].shape[-2:]
        return torch.cat([f.float() if f.shape[-2:] == grid else
                          F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False) for f in feats], 1)

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        return (self._teacher_raw(x) - self.teacher_mean_) / self.teacher_std_

    def _norm(self, x01: torch.Tensor) -> torch.Tensor:
        ex = self.feature_extractor()
        mean = torch.tensor(ex.mean, device=x01.device).view(1, 3, 1, 1)
        std = torch.tensor(ex.std, device=x01.device).view(1, 3, 1, 1)
        return (x01 - mean) / std

    def _unnorm(self, x: torch.Tensor) -> torch.Tensor:
        ex = self.feature_extractor()
        mean = torch.tensor(ex.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(ex.std, device=x.device).view(1, 3, 1, 1)
        return x * std + mean

    def _raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, g, g) student-teacher and autoencoder-student maps (squared differences, channel mean)."""
        c = self._channels
        t = self._teacher(x)
        s = self.student_(x)
        a = self.autoencoder_(x)
        return (t - s[:, :c]).pow(2).mean(1), (a - s[:, c:]).pow(2).mean(1)

    # --- training ---------------------------------------------------------------------------------
    def _train(self, images: Sequence[np.ndarray], progress: Progress, dev: torch.device) -> None:
        gen = torch.Generator().manual_seed(int(self.seed))
        train_idx, val_idx = split_validation(len(images), float(self.val_fraction), gen)
        pre = self.preprocess
        # Decoded once, kept as uint8 frames: 0.2 MB per 256 px image.
        frames = torch.from_numpy(np.stack([pre.image_to_frame(images[i]) for i in range(len(images))]))
        frames = frames.permute(0, 3, 1, 2).contiguous()

        def batch_tensor(idx: torch.Tensor) -> torch.Tensor:
            return self._norm(frames[idx].to(dev).float() / 255.0)

        # Per-channel teacher statistics over the training images (the paper's teacher normalisation).
        s1 = s2 = None
        count = 0
        for start in range(0, len(train_idx), FEATURE_BATCH):
            f = self._teacher_raw(batch_tensor(train_idx[start:start + FEATURE_BATCH])).double()
            s1 = f.sum((0, 2, 3)) if s1 is None else s1 + f.sum((0, 2, 3))
            s2 = f.pow(2).sum((0, 2, 3)) if s2 is None else s2 + f.pow(2).sum((0, 2, 3))
            count += f.shape[0] * f.shape[2] * f.shape[3]
            grid = f.shape[-1]
            progress("features", min(start + FEATURE_BATCH, len(train_idx)), len(train_idx))
        mean = s1 / count
        self.teacher_mean_ = mean.float().view(1, -1, 1, 1)
        self.teacher_std_ = (s2 / count - mean.pow(2)).clamp_min(1e-12).sqrt().float().view(1, -1, 1, 1)
        self.grid_ = int(grid)

        student, ae = self._make_nets(self.grid_)
        self.student_, self.autoencoder_ = student.to(dev), ae.to(dev)
        self.teacher_mean_, self.teacher_std_ = self.teacher_mean_.to(dev), self.teacher_std_.to(dev)
        params = list(student.parameters()) + list(ae.parameters())
        opt = torch.optim.Adam(params, lr=float(self.lr), weight_decay=float(self.weight_decay))
        steps, bs, c = int(self.steps), int(self.batch_size), self._channels
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(LR_DROP_AT * steps)), gamma=LR_DROP)
        student.train()
        ae.train()
        order, pos, history, running = torch.empty(0, dtype=torch.long), 0, [], []
        report_every = max(1, steps // PROGRESS_REPORTS)
        for step in range(steps):
            if pos + bs > len(order):
                order, pos = train_idx[torch.randperm(len(train_idx), generator=gen)], 0
                if bs > len(order):
                    order = order.repeat(math.ceil(bs / len(order)))
            idx = order[pos:pos + bs]
            pos += bs
            x = batch_tensor(idx)
            x_ae = self._norm(colour_jitter(self._unnorm(x), gen))
            penalty = self._norm(sample_penalty(bs, int(self.penalty_size), gen).to(dev))
            with torch.no_grad():
                t = self._teacher(x)
                t_ae = self._teacher(x_ae)
            loss_hard = hard_feature_loss(t, student(x)[:, :c], float(self.hard_quantile))
            loss_penalty = student(penalty)[:, :c].pow(2).mean()
            a = ae(x_ae)
            s_ae = student(x_ae)[:, c:]
            loss_ae = (t_ae - a).pow(2).mean()
            loss_stae = (a - s_ae).pow(2).mean()
            loss = loss_hard + loss_penalty + loss_ae + loss_stae
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append([float(v.detach()) for v in (loss_hard, loss_penalty, loss_ae, loss_stae)])
            if (step + 1) % max(1, steps // HISTORY_POINTS) == 0 or step + 1 == steps:
                mean_losses = np.mean(running, axis=0).tolist()
                history.append({"step": step + 1, **dict(zip(("hard", "penalty", "ae", "stae"), mean_losses))})
                running = []
            if (step + 1) % report_every == 0 or step + 1 == steps:
                progress("step", step + 1, steps)
        student.eval()
        ae.eval()
        self.history_ = history
        self._fit_quantiles(val_idx if len(val_idx) else train_idx, batch_tensor)

    @torch.no_grad()
    def _fit_quantiles(self, idx: torch.Tensor, batch_tensor) -> None:
        st, ae = [], []
        for start in range(0, len(idx), FEATURE_BATCH):
            m_st, m_ae = self._raw_maps(batch_tensor(idx[start:start + FEATURE_BATCH]))
            st.append(m_st.flatten().cpu())
            ae.append(m_ae.flatten().cpu())
        st, ae = torch.cat(st).double(), torch.cat(ae).double()
        q = torch.tensor(MAP_QUANTILES, dtype=torch.float64)
        self.quantiles_ = torch.cat([_quantile(st, q), _quantile(ae, q)]).float()
        self.n_quantile_images_ = int(len(idx))

    # --- scoring ----------------------------------------------------------------------------------
    def score_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m_st, m_ae = self._raw_maps(x.to(resolve_device(self.device)))
        q = self.quantiles_.to(m_st.device)
        m_st = NORMALISED_QB * (m_st - q[0]) / (q[1] - q[0]).clamp_min(1e-12)
        m_ae = NORMALISED_QB * (m_ae - q[2]) / (q[3] - q[2]).clamp_min(1e-12)
        grid_map = (0.5 * m_st + 0.5 * m_ae).float().cpu()
        maps = upsample_blur(grid_map, tuple(x.shape[-2:]), float(self.blur_sigma))
        return maps.flatten(1).max(1).values, maps

    # --- persistence ------------------------------------------------------------------------------
    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"student.{k}": v for k, v in self.student_.state_dict().items()}
        tensors.update({f"autoencoder.{k}": v for k, v in self.autoencoder_.state_dict().items()})
        tensors.update({"teacher_mean": self.teacher_mean_, "teacher_std": self.teacher_std_,
                        "quantiles": self.quantiles_})
        return tensors

    def _fitted_json(self) -> dict:
        return {"grid": self.grid_, "history": self.history_, "n_quantile_images": self.n_quantile_images_}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        dev = resolve_device(self.device)
        self.grid_ = int(fitted["grid"])
        self.history_ = fitted["history"]
        self.n_quantile_images_ = fitted["n_quantile_images"]
        student, ae = self._make_nets(self.grid_)
        student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
        ae.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("autoencoder.")})
        self.student_, self.autoencoder_ = student.to(dev).eval(), ae.to(dev).eval()
        self.teacher_mean_ = tensors["teacher_mean"].to(dev)
        self.teacher_std_ = tensors["teacher_std"].to(dev)
        self.quantiles_ = tensors["quantiles"]

    def _card_extra(self) -> dict:
        return {"teacher": {"kind": "frozen pretrained backbone stages (no PDN teacher: the paper's ImageNet-"
                                    "distilled PDN weights do not exist here): see backbone",
                            "grid": self.grid_,
                            "normalisation": "per-channel mean/std over the training images"},
                "student": {"architecture": "PDN-S (padded)", "width": float(self.student_width),
                            "parameters": int(sum(p.numel() for p in self.student_.parameters()))},
                "autoencoder": {"width": int(self.ae_width),
                                "parameters": int(sum(p.numel() for p in self.autoencoder_.parameters()))},
                "training": {"steps": int(self.steps), "batch_size": int(self.batch_size),
                             "optimiser": f"Adam lr {self.lr:g} (x0.1 for the last 5% of steps), "
                                          f"weight decay {self.weight_decay:g}",
                             "losses": "hard feature loss (quantile {:g}) + natural-image penalty + autoencoder + "
                                       "student-vs-autoencoder on colour-jittered images".format(self.hard_quantile),
                             "penalty_images": "natural images bundled with scikit-image, random crops, 30% grey",
                             "history": self.history_},
                "normalisation": {"quantiles": [float(v) for v in self.quantiles_],
                                  "from_validation_images": self.n_quantile_images_},
                "score": "map = 0.5 * st + 0.5 * ae, each 0.1 * (m - q0.9) / (q0.995 - q0.9); image = max of map"}


def _quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile without its 16M-element limit (a sort; linear interpolation, as numpy's default)."""
    v = values.sort().values
    pos = q * (len(v) - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return v[lo] + (v[hi] - v[lo]) * (pos - lo.double())

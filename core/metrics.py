"""Evaluation metrics for anomaly detectors: image AUROC, pixel AUROC, AUPRO, F1-max and plotting curves.

Conventions (see DESIGN.md section 3):

- label 1 / mask pixel != 0 means anomalous; anomalous is the positive class everywhere;
- a sample is predicted anomalous when ``score >= threshold``;
- pixel metrics take the masks at the score map's resolution (resize before calling); ``masks`` and ``maps``
  are either ``(N, H, W)`` arrays or equally long lists of ``(H, W)`` arrays whose sizes may differ per image;
- every function returns plain Python floats/ints (or numpy arrays for curves), never numpy scalars.

AUPRO follows Bergmann et al. (MVTec AD): PRO(t) is the mean, over every 8-connected component of every
ground-truth mask, of the fraction of the component with ``map >= t``; FPR(t) is the fraction of normal pixels
(mask == 0, over all images, normal images included) with ``map >= t``. The exact curve is built at every
distinct score value and integrated with the trapezoid rule up to ``fpr_limit``, then divided by ``fpr_limit``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "pro_curve",
    "f1_max",
    "f1_at",
    "roc_points",
    "pr_points",
    "confusion_at",
    "headline_metrics",
]

# 8-connectivity, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

MasksLike = np.ndarray | Sequence[np.ndarray]


# ----------------------------------------------------------------------------------------------- validation


def _binary_labels(labels, name: str = "labels") -> np.ndarray:
    """Return labels as a 1-D bool array; only {0, 1} (or bool) is accepted."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.dtype != bool:
        # Cheap check (no np.unique) so confusion_at stays fast on every slider move.
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError(f"{name} must contain only 0 (normal) and 1 (anomalous)")
        labels = labels == 1
    return labels


def _scores_like(scores, labels: np.ndarray) -> np.ndarray:
    """Return scores as a 1-D float array matching labels, rejecting NaN."""
    scores = np.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be 1-D with one entry per label: got {scores.shape}, labels {labels.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def _require_both_classes(labels: np.ndarray, what: str) -> None:
    n_positive = int(np.count_nonzero(labels))
    if n_positive == 0 or n_positive == labels.size:
        present = "anomalous (1)" if n_positive else "normal (0)"
        raise ValueError(f"{what} is undefined when only one class is present: every sample is {present}")


def _image_lists(masks: MasksLike, maps: MasksLike) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Check masks/maps pairwise and return them as lists of bool masks and float maps."""
    if masks is None or maps is None:
        raise ValueError("pixel metrics need both masks and maps")
    for name, value in (("masks", masks), ("maps", maps)):
        if isinstance(value, np.ndarray) and value.ndim != 3:
            raise ValueError(f"{name} must be (N, H, W) or a list of (H, W) arrays, got shape {value.shape}")
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    if len(masks) == 0:
        raise ValueError("pixel metrics need at least one image")
    mask_list, map_list = [], []
    for index, (mask, score_map) in enumerate(zip(masks, maps)):
        if mask is None:
            raise ValueError(f"mask {index} is None; headline_metrics() leaves such images out, do the same "
                             "before calling")
        mask, score_map = np.asarray(mask), np.asarray(score_map)
        if mask.ndim != 2 or mask.shape != score_map.shape:
            raise ValueError(
                f"image {index}: mask {mask.shape} and map {score_map.shape} must be the same 2-D shape "
                "(resize the mask to the map's resolution)"
            )
        if not np.issubdtype(score_map.dtype, np.floating):
            score_map = score_map.astype(np.float64)
        # != 0 rather than == 1 so 0/255 masks read from PNG files work as they are.
        mask_list.append(mask if mask.dtype == bool else mask != 0)
        map_list.append(score_map)
    return mask_list, map_list


def _flat_pixels(mask_list: list[np.ndarray], map_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every image's pixels into one 1-D mask and one 1-D score array."""
    pixel_mask = np.concatenate([mask.ravel() for mask in mask_list])
    pixel_scores = np.concatenate([score_map.ravel() for score_map in map_list])
    if np.isnan(pixel_scores).any():
        raise ValueError("maps contain NaN")
    return pixel_mask, pixel_scores


# ------------------------------------------------------------------------------------------- image metrics


def image_auroc(labels, scores) -> float:
    """ROC AUC of image scores with anomalous (label 1) as the positive class; ties count half, as in sklearn."""
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    _require_both_classes(labels, "image AUROC")
    return float(roc_auc_score(labels, scores))


def roc_points(labels, scores) -> dict:
    """ROC curve for plotting: ``{"fpr", "tpr", "thresholds"}`` from sklearn.metrics.roc_curve.

    ``thresholds[0]`` is ``inf`` (nothing predicted anomalous); collinear points are dropped, as sklearn does.
    """
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    _require_both_classes(labels, "the ROC curve")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def pr_points(labels, scores) -> dict:
    """Precision-recall curve for plotting: ``{"precision", "recall", "thresholds"}`` from sklearn.

    ``precision`` and ``recall`` have one more entry than ``thresholds``: the final (recall 0, precision 1) point.
    """
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    if not labels.any():
        raise ValueError("the precision-recall curve is undefined without anomalous (label 1) samples")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    return {"precision": precision, "recall": recall, "thresholds": thresholds}


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds (anomalous when ``score >= threshold``) and the threshold that gives it.

    Among thresholds with the same best F1 the highest is returned: it flags the fewest images.
    """
    curve = pr_points(labels, scores)
    # The last PR point has no threshold (recall 0); it can never be the best F1, so drop it.
    precision, recall = curve["precision"][:-1], curve["recall"][:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # thresholds ascend: last maximum = highest threshold
    return float(f1[best]), float(curve["thresholds"][best])


def confusion_at(labels, scores, threshold: float) -> dict:
    """Confusion counts and rates when ``score >= threshold`` means anomalous.

    Returns tp, fp, tn, fn (ints) and precision, recall (= TPR), fpr, f1, accuracy (floats).
    A ratio whose denominator is 0 (for example precision when nothing is flagged) is defined as 0.0.
    Plain numpy and no sorting, so it is cheap enough to call on every slider move.
    """
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    flagged = scores >= threshold
    tp = int(np.count_nonzero(flagged & labels))
    fp = int(np.count_nonzero(flagged)) - tp
    fn = int(np.count_nonzero(labels)) - tp
    tn = labels.size - tp - fp - fn

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else 0.0

    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "fpr": ratio(fp, fp + tn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, labels.size),
    }


def f1_at(labels, scores, threshold: float) -> float:
    """F1 when ``score >= threshold`` means anomalous (0.0 when nothing is flagged and nothing is anomalous)."""
    return confusion_at(labels, scores, threshold)["f1"]


# ------------------------------------------------------------------------------------------- pixel metrics


def pixel_auroc(masks: MasksLike, maps: MasksLike) -> float:
    """ROC AUC over all pixels of all images, mask pixels != 0 being positive.

    ``masks`` and ``maps`` are ``(N, H, W)`` arrays or lists of ``(H, W)`` arrays (sizes may differ per image).
    """
    pixel_mask, pixel_scores = _flat_pixels(*_image_lists(masks, maps))
    _require_both_classes(pixel_mask, "pixel AUROC")
    return float(roc_auc_score(pixel_mask, pixel_scores))


def pro_curve(masks: MasksLike, maps: MasksLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: ``(fpr, pro)`` at every distinct score, from (0, 0) to (1, 1), fpr non-decreasing.

    Images with an empty mask add no components but their pixels count as normal for the FPR.
    """
    mask_list, map_list = _image_lists(masks, maps)
    _, pixel_scores = _flat_pixels(mask_list, map_list)

    # One global component id per pixel (0 = normal), so a single weight lookup serves every image.
    component_ids = np.zeros(pixel_scores.size, dtype=np.int64)
    component_sizes: list[np.ndarray] = []
    n_components = 0
    start = 0
    for mask in mask_list:
        stop = start + mask.size
        if mask.any():
            labelled, n_found = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            labelled = labelled.ravel()
            in_component = labelled > 0
            component_ids[start:stop][in_component] = labelled[in_component] + n_components
            component_sizes.append(np.bincount(labelled, minlength=n_found + 1)[1:])
            n_components += n_found
        start = stop
    if n_components == 0:
        raise ValueError("PRO is undefined: no mask has an anomalous pixel")
    n_normal = int(np.count_nonzero(component_ids == 0))
    if n_normal == 0:
        raise ValueError("PRO is undefined: there are no normal pixels to measure the false-positive rate on")

    # A pixel of component c adds 1 / (|c| * n_components) to PRO once the threshold reaches its score.
    pro_weight = np.zeros(n_components + 1)
    pro_weight[1:] = 1.0 / (np.concatenate(component_sizes) * n_components)

    order = np.argsort(pixel_scores)[::-1]  # descending score: lowering the threshold adds pixels in this order
    scores_desc = pixel_scores[order]
    ids_desc = component_ids[order]
    del order
    cumulative_pro = np.cumsum(pro_weight[ids_desc])
    cumulative_normal = np.cumsum(ids_desc == 0)
    # Tied scores are all in or all out at a threshold, so only the last index of each tie group is a cut.
    cut = np.flatnonzero(scores_desc[1:] != scores_desc[:-1])
    cut = np.append(cut, scores_desc.size - 1)
    fpr = np.concatenate(([0.0], cumulative_normal[cut] / n_normal))
    pro = np.concatenate(([0.0], np.minimum(cumulative_pro[cut], 1.0)))  # clip float round-off above 1
    return fpr, pro


def aupro(masks: MasksLike, maps: MasksLike, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (a perfect map gives 1.0).

    Trapezoid rule on the exact curve; the PRO value at exactly ``fpr_limit`` is interpolated linearly.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    first_beyond = int(np.searchsorted(fpr, fpr_limit, side="right"))  # first point with fpr > fpr_limit
    if first_beyond < fpr.size:
        # fpr[first_beyond - 1] <= fpr_limit < fpr[first_beyond], so the segment has a positive width.
        left, right = first_beyond - 1, first_beyond
        fraction = (fpr_limit - fpr[left]) / (fpr[right] - fpr[left])
        pro_at_limit = pro[left] + fraction * (pro[right] - pro[left])
        fpr = np.append(fpr[:first_beyond], fpr_limit)
        pro = np.append(pro[:first_beyond], pro_at_limit)
    return float(np.trapezoid(pro, fpr) / fpr_limit)


# ---------------------------------------------------------------------------------------------- all at once


def headline_metrics(labels, scores, masks: MasksLike | None = None, maps: MasksLike | None = None) -> dict:
    """All headline metrics for one test set.

    Always: ``image_auroc``, ``f1_max``, ``f1_threshold``. Also ``pixel_auroc`` and ``aupro`` when masks and
    maps are given and at least one mask has an anomalous pixel. ``masks`` may hold ``None`` for images without a
    mask: those images are left out of the pixel metrics entirely (their pixels count neither as anomalous nor
    as normal), so give normal images an all-zero mask, not ``None``, if their pixels should count in the FPR.
    """
    labels = _binary_labels(labels)
    result = {"image_auroc": image_auroc(labels, scores)}
    result["f1_max"], result["f1_threshold"] = f1_max(labels, scores)
    if masks is None or maps is None:
        return result
    if len(maps) != labels.size or len(masks) != labels.size:
        raise ValueError(f"got {labels.size} labels but {len(masks)} masks and {len(maps)} maps")
    if not isinstance(masks, np.ndarray):  # an (N, H, W) array cannot hold None
        kept = [index for index, mask in enumerate(masks) if mask is not None]
        masks = [masks[index] for index in kept]
        maps = [maps[index] for index in kept]
    if any(np.any(mask) for mask in masks):
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["aupro"] = aupro(masks, maps)
    return result

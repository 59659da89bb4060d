"""Behaviour of core.metrics against hand-computed cases, sklearn, and slow reference implementations."""

import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from core import metrics


# ------------------------------------------------------------------------------------------------ helpers


def blobby_data(seed: int, n_images: int = 12, size: int = 32, n_normal: int = 4):
    """Masks made of smooth random blobs (several components per image) and noisy maps that mostly follow them."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((n_images, size, size)), sigma=(0, 2.5, 2.5))
    masks = field > np.quantile(field, 0.9)
    masks[:n_normal] = False  # some normal images: their pixels only count in the FPR
    maps = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5)) + 0.25 * rng.standard_normal(masks.shape)
    return masks, maps


def reference_aupro(masks, maps, fpr_limit=0.3, n_thresholds=400):
    """Slow but obviously correct AUPRO: loop over thresholds, measure every component directly."""
    masks = [np.asarray(m, dtype=bool) for m in masks]
    maps = [np.asarray(m, dtype=float) for m in maps]
    components = []  # (image index, boolean component mask)
    for index, mask in enumerate(masks):
        labelled, n_found = ndimage.label(mask, structure=np.ones((3, 3)))
        components += [(index, labelled == c) for c in range(1, n_found + 1)]
    n_normal = sum(np.sum(~m) for m in masks)
    all_scores = np.concatenate([m.ravel() for m in maps])
    thresholds = np.unique(np.quantile(all_scores, np.linspace(0, 1, n_thresholds)))
    fprs, pros = [0.0], [0.0]  # threshold above every score
    for t in thresholds[::-1]:
        predicted = [m >= t for m in maps]
        fprs.append(sum(np.sum(p & ~m) for p, m in zip(predicted, masks)) / n_normal)
        pros.append(np.mean([np.sum(predicted[i] & comp) / np.sum(comp) for i, comp in components]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    pro_at_limit = np.interp(fpr_limit, fprs, pros)
    x = np.append(fprs[keep], fpr_limit)
    y = np.append(pros[keep], pro_at_limit)
    return np.trapezoid(y, x) / fpr_limit


def brute_force_f1_max(labels, scores):
    labels = np.asarray(labels, dtype=bool)
    best = 0.0
    for t in np.unique(scores):
        flagged = scores >= t
        tp = np.sum(flagged & labels)
        fp = np.sum(flagged & ~labels)
        fn = np.sum(~flagged & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


# ------------------------------------------------------------------------------------------------ image AUROC


def test_image_auroc_hand_case():
    # Positive/negative pairs: (0.35 vs 0.1) win, (0.35 vs 0.4) lose, 0.8 beats both -> 3 of 4.
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_ties_count_half():
    assert metrics.image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # Positive 0.5 ties negative 0.5 (1/2) and beats 0.2 (1); positive 0.1 loses both pairs -> 1.5 of 4.
    assert metrics.image_auroc([0, 0, 1, 1], [0.5, 0.2, 0.5, 0.1]) == pytest.approx((0.5 + 1) / 4)


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 20, 500) + 0.7 * labels  # many exact ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    continuous = rng.random(500) + 0.3 * labels
    assert metrics.image_auroc(labels, continuous) == pytest.approx(roc_auc_score(labels, continuous), abs=1e-12)


def test_image_auroc_returns_python_float_and_rejects_one_class():
    assert type(metrics.image_auroc([0, 1], [0.0, 1.0])) is float
    with pytest.raises(ValueError, match="only one class"):
        metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(normal\\) and 1"):
        metrics.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="one entry per label"):
        metrics.image_auroc([0, 1], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------------------ pixel AUROC


def test_pixel_auroc_matches_sklearn_on_flattened_pixels():
    masks, maps = blobby_data(seed=1)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # 0/255 masks (as read from PNG files) mean the same thing
    assert metrics.pixel_auroc(masks.astype(np.uint8) * 255, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_accepts_differently_sized_maps():
    rng = np.random.default_rng(2)
    shapes = [(24, 24), (15, 33), (40, 12)]
    masks = [rng.random(s) < 0.2 for s in shapes]
    maps = [m + rng.standard_normal(m.shape) for m in masks]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([s.ravel() for s in maps])
    )
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert metrics.aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=2e-3)


def test_pixel_inputs_are_validated():
    with pytest.raises(ValueError, match="same 2-D shape"):
        metrics.pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="got 2 masks but 1 maps"):
        metrics.pixel_auroc([np.zeros((4, 4))] * 2, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="only one class"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))


# ------------------------------------------------------------------------------------------------ PRO / AUPRO

# One 3x6 image with two components: A = 1 pixel, B = 4 pixels; 13 normal pixels.
HAND_MASK = np.array(
    [
        [1, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=bool,
)
HAND_MAP = np.array(
    [
        [0.9, 0.85, 0.1, 0.1, 0.8, 0.8],
        [0.1, 0.5, 0.1, 0.1, 0.3, 0.3],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ]
)


def test_pro_curve_hand_case():
    # t=0.9: A full, B empty -> PRO 0.5, FPR 0.  t=0.85: one normal pixel -> FPR 1/13.
    # t=0.8: half of B -> PRO 0.75.  t=0.5: FPR 2/13.  t=0.3: all of B -> PRO 1.  t=0.1: FPR 1.
    fpr, pro = metrics.pro_curve(HAND_MASK[None], HAND_MAP[None])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 13, 1 / 13, 2 / 13, 2 / 13, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 0.75, 1, 1])


def test_aupro_hand_case():
    # Area up to FPR 0.3: 0.5 * 1/13 + 0.75 * 1/13 + 1 * (0.3 - 2/13), then divided by 0.3.
    expected = (0.5 / 13 + 0.75 / 13 + (0.3 - 2 / 13)) / 0.3
    assert metrics.aupro(HAND_MASK[None], HAND_MAP[None]) == pytest.approx(expected, abs=1e-12)
    # A limit inside the flat 0.75 step: (0.5/13 + 0.75 * 0.5/13) / (1.5/13)
    assert metrics.aupro(HAND_MASK[None], HAND_MAP[None], fpr_limit=1.5 / 13) == pytest.approx(
        (0.5 + 0.375) / 1.5, abs=1e-12
    )


def test_aupro_interpolates_pro_at_the_fpr_limit():
    # One component of 2 pixels; the score 0.5 is shared by an anomalous and a normal pixel, so the curve
    # goes straight from (0, 0.5) to (0.5, 1). PRO at FPR 0.3 is 0.5 + 0.5 * 0.3 / 0.5 = 0.8.
    mask = np.array([[1, 1, 0, 0]], dtype=bool)
    score_map = np.array([[0.9, 0.5, 0.5, 0.1]])
    fpr, pro = metrics.pro_curve([mask], [score_map])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1, 1])
    assert metrics.aupro([mask], [score_map]) == pytest.approx(0.3 * (0.5 + 0.8) / 2 / 0.3, abs=1e-12)


def test_aupro_components_use_8_connectivity():
    # Pixels (0,0) and (1,1) touch only diagonally: one component with 8-connectivity, two with 4-connectivity.
    # A third, separate pixel is missed. Catching the diagonal pair gives PRO 1/2 (it would be 2/3 with 4-conn).
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[4, 4] = True
    score_map = np.zeros((5, 5))
    score_map[0, 0] = score_map[1, 1] = 1.0
    fpr, pro = metrics.pro_curve([mask], [score_map])
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(0.5))


def test_aupro_perfect_and_inverted_maps():
    masks, _ = blobby_data(seed=3)
    perfect = masks.astype(float)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    # Every normal pixel outranks every anomalous one: PRO stays 0 until FPR reaches 1.
    assert metrics.aupro(masks, -perfect) == pytest.approx(0.0, abs=1e-12)
    _, noisy = blobby_data(seed=3)
    assert metrics.aupro(masks, -noisy) < 0.05


def test_aupro_skips_empty_masks_but_counts_their_pixels_as_normal():
    masks, maps = blobby_data(seed=4)
    fpr, pro = metrics.pro_curve(masks, maps)
    n_normal = np.count_nonzero(~masks)

    # An anomalous image whose mask is empty, with a map below every other score: it adds no component,
    # so every PRO value is unchanged, while its pixels join the FPR denominator (FPR scales down) and only
    # add one extra point, at a threshold below everything else.
    empty_mask = np.zeros((1, *masks.shape[1:]), dtype=bool)
    low_map = np.full((1, *masks.shape[1:]), maps.min() - 1.0)
    fpr_more, pro_more = metrics.pro_curve(np.concatenate([masks, empty_mask]), np.concatenate([maps, low_map]))
    n_added = empty_mask.size
    np.testing.assert_allclose(fpr_more[:-1], fpr * n_normal / (n_normal + n_added))
    np.testing.assert_allclose(pro_more[:-1], pro)
    assert (fpr_more[-1], pro_more[-1]) == (1.0, 1.0)

    # Duplicating the whole test set leaves every FPR (numerator and denominator double) and every PRO
    # (a mean over twice the same components) unchanged.
    doubled = metrics.aupro(np.concatenate([masks, masks]), np.concatenate([maps, maps]))
    assert doubled == pytest.approx(metrics.aupro(masks, maps), abs=1e-12)


def test_aupro_matches_slow_reference():
    for seed in (5, 6):
        masks, maps = blobby_data(seed=seed)
        assert metrics.aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=2e-3)
        assert metrics.aupro(masks, maps, fpr_limit=0.05) == pytest.approx(
            reference_aupro(masks, maps, fpr_limit=0.05), abs=2e-3
        )


def test_pro_curve_is_a_monotone_curve_from_origin_to_one():
    masks, maps = blobby_data(seed=7)
    fpr, pro = metrics.pro_curve(masks, maps)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert len(fpr) == len(np.unique(maps)) + 1  # one point per distinct score, plus the origin


def test_aupro_rejects_undefined_cases():
    with pytest.raises(ValueError, match="no mask has an anomalous pixel"):
        metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal pixels"):
        metrics.aupro(np.ones((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(HAND_MASK[None], HAND_MAP[None], fpr_limit=0.0)


def test_aupro_is_fast_on_a_typical_test_set():
    # 100 maps of 224x224 (~5M pixels); the design budget is about 3 s. CPU time, not wall time, in every speed
    # test: another process busy on the machine (a benchmark, a parallel build) does not count against us.
    rng = np.random.default_rng(8)
    masks = np.zeros((100, 224, 224), dtype=bool)
    masks[50:, 60:120, 80:150] = True
    maps = rng.random(masks.shape, dtype=np.float32) + masks
    start = time.process_time()
    value = metrics.aupro(masks, maps)
    elapsed = time.process_time() - start
    assert value == pytest.approx(1.0)  # every anomalous pixel outranks every normal one
    assert elapsed < 6.0, f"aupro took {elapsed:.2f} s"


# ------------------------------------------------------------------------------------------------ F1 and confusion

F1_LABELS = [0, 0, 1, 1, 0, 1]
F1_SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def test_f1_max_hand_case():
    # At t=0.3: tp 3, fp 1, fn 0 -> F1 = 6/7; every other threshold does worse (0.4 -> 2/3, 0.6 -> 1/2).
    f1, threshold = metrics.f1_max(F1_LABELS, F1_SCORES)
    assert f1 == pytest.approx(6 / 7) and threshold == pytest.approx(0.3)
    assert type(f1) is float and type(threshold) is float


def test_f1_max_equals_brute_force():
    rng = np.random.default_rng(9)
    for _ in range(5):
        labels = rng.integers(0, 2, 200)
        scores = np.round(rng.random(200) + 0.4 * labels, 2)  # rounding creates ties
        f1, threshold = metrics.f1_max(labels, scores)
        assert f1 == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
        assert metrics.f1_at(labels, scores, threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_max_prefers_the_highest_threshold_on_ties():
    # t=0.8 (tp 1, fn 1) and t=0.2 (tp 2, fp 2) both give F1 2/3; 0.6 and 0.4 give 1/2 and 2/5.
    # The stricter threshold is returned.
    f1, threshold = metrics.f1_max([1, 0, 0, 1], [0.8, 0.6, 0.4, 0.2])
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx(0.8)


def test_confusion_at_hand_case_and_boundary():
    # threshold 0.4 flags 0.4 (boundary, label 1), 0.5 (label 0) and 0.6 (label 1).
    summary = metrics.confusion_at(F1_LABELS, F1_SCORES, 0.4)
    assert (summary["tp"], summary["fp"], summary["tn"], summary["fn"]) == (2, 1, 2, 1)
    assert summary["precision"] == pytest.approx(2 / 3)
    assert summary["recall"] == pytest.approx(2 / 3)
    assert summary["fpr"] == pytest.approx(1 / 3)
    assert summary["f1"] == pytest.approx(2 / 3)
    assert summary["accuracy"] == pytest.approx(4 / 6)
    # Just above the boundary score, 0.4 is no longer flagged.
    assert metrics.confusion_at(F1_LABELS, F1_SCORES, np.nextafter(0.4, 1))["tp"] == 1


def test_confusion_at_defines_zero_over_zero_as_zero():
    summary = metrics.confusion_at(F1_LABELS, F1_SCORES, 10.0)  # nothing flagged
    assert (summary["tp"], summary["fp"], summary["tn"], summary["fn"]) == (0, 0, 3, 3)
    assert summary["precision"] == 0.0 and summary["f1"] == 0.0 and summary["accuracy"] == 0.5
    all_normal = metrics.confusion_at([0, 0], [0.1, 0.2], 0.0)  # no positives at all
    assert all_normal["recall"] == 0.0 and all_normal["fpr"] == 1.0
    assert all(type(v) is int for k, v in all_normal.items() if k in ("tp", "fp", "tn", "fn"))


def test_confusion_at_is_cheap():
    rng = np.random.default_rng(10)
    labels, scores = rng.integers(0, 2, 1000), rng.random(1000)
    metrics.confusion_at(labels, scores, 0.5)  # warm-up
    start = time.process_time()
    for _ in range(200):
        metrics.confusion_at(labels, scores, 0.5)
    per_call = (time.process_time() - start) / 200
    assert per_call < 1e-3, f"confusion_at took {per_call * 1e6:.0f} us"


# ------------------------------------------------------------------------------------------------ curves


def test_roc_and_pr_points():
    roc = metrics.roc_points(F1_LABELS, F1_SCORES)
    assert set(roc) == {"fpr", "tpr", "thresholds"}
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and np.isinf(roc["thresholds"][0])
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(metrics.image_auroc(F1_LABELS, F1_SCORES))
    pr = metrics.pr_points(F1_LABELS, F1_SCORES)
    assert set(pr) == {"precision", "recall", "thresholds"}
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"]) + 1
    at_03 = int(np.flatnonzero(pr["thresholds"] == 0.3)[0])
    assert (pr["precision"][at_03], pr["recall"][at_03]) == pytest.approx((0.75, 1.0))


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_keys():
    masks, maps = blobby_data(seed=11)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    image_only = metrics.headline_metrics(labels, scores)
    assert set(image_only) == {"image_auroc", "f1_max", "f1_threshold"}
    assert image_only["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    full = metrics.headline_metrics(labels, scores, masks, maps)
    assert set(full) == {"image_auroc", "f1_max", "f1_threshold", "pixel_auroc", "aupro"}
    assert full["aupro"] == pytest.approx(metrics.aupro(masks, maps))
    assert full["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps))
    # every mask empty: no pixel metrics
    assert set(metrics.headline_metrics(labels, scores, np.zeros_like(masks), maps)) == set(image_only)


def test_evaluate_leaves_out_images_whose_mask_is_none():
    masks, maps = blobby_data(seed=12)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    with_none = list(masks)
    with_none[-1] = None  # an anomalous image without a mask
    with_none[0] = None  # a normal image without a mask
    result = metrics.headline_metrics(labels, scores, with_none, list(maps))
    assert result["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks[1:-1], maps[1:-1]), abs=1e-12)
    assert result["aupro"] == pytest.approx(metrics.aupro(masks[1:-1], maps[1:-1]), abs=1e-12)
    assert result["aupro"] != pytest.approx(metrics.aupro(masks, maps), abs=1e-6)
    # only None masks: no pixel metrics
    assert "aupro" not in metrics.headline_metrics(labels, scores, [None] * len(maps), list(maps))
    with pytest.raises(ValueError, match="labels but"):
        metrics.headline_metrics(labels, scores, masks[:-1], maps[:-1])

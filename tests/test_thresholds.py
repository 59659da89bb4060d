"""Threshold presets and the precomputed score distribution, checked against core.metrics."""
import time

import numpy as np
import pytest

from core import metrics
from core.thresholds import ScoreDistribution


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(700, int), np.ones(300, int)]
    scores = np.r_[rng.normal(1.0, 0.3, 700), rng.normal(2.0, 0.5, 300)].round(3)  # rounding makes ties
    return labels, scores


def test_confusion_matches_metrics_everywhere(scored):
    labels, scores = scored
    dist = ScoreDistribution.from_scores(labels, scores)
    for t in [-5, scores.min(), 0.8, 1.234, 1.5, np.median(scores), 2.5, scores.max(), 9]:
        assert dist.confusion(t) == pytest.approx(metrics.confusion_at(labels, scores, t))


def test_curves_and_f1_agree_with_metrics(scored):
    labels, scores = scored
    dist = ScoreDistribution.from_scores(labels, scores)
    assert dist.auroc() == pytest.approx(metrics.image_auroc(labels, scores))
    best_f1, best_t = metrics.f1_max(labels, scores)
    assert dist.f1_max() == pytest.approx(best_t)
    assert dist.confusion(dist.f1_max())["f1"] == pytest.approx(best_f1)
    recall, precision = dist.precision_recall()
    assert np.all(np.diff(recall) >= 0) and precision.min() > 0


def test_presets_do_what_they_say(scored):
    labels, scores = scored
    dist = ScoreDistribution.from_scores(labels, scores)
    t = dist.zero_miss()
    assert dist.confusion(t)["fn"] == 0
    assert dist.confusion(np.nextafter(t, np.inf))["fn"] > 0          # it is the highest such threshold
    for fpr in (0.0, 0.01, 0.05, 0.5):
        t = dist.target_fpr(fpr)
        assert dist.confusion(t)["fpr"] <= fpr
        lower = dist.thresholds[dist.thresholds < t]
        if lower.size:
            assert dist.confusion(lower[-1])["fpr"] > fpr                # and the lowest one
    normal = scores[labels == 0]
    t = dist.normal_quantile(0.99)
    assert np.mean(normal >= t) <= 0.01 and np.mean(normal < t) >= 0.99


def test_the_gap_preset_puts_the_threshold_halfway_between_the_highest_good_and_the_lowest_defect():
    # good 0.1, 0.3, 0.4; defective 0.6, 0.9: the gap runs from 0.4 to 0.6, its middle is 0.5
    dist = ScoreDistribution.from_scores([0, 0, 0, 1, 1], [0.1, 0.3, 0.4, 0.6, 0.9])
    gap = dist.gap()
    assert (gap.highest_normal, gap.lowest_anomalous, gap.separated) == (0.4, 0.6, True)
    assert gap.width == pytest.approx(0.2) and (gap.normal_above, gap.anomalous_below) == (0, 0)
    assert dist.preset("gap_middle") == pytest.approx(0.5) and "gap_middle" in dist.available_presets()
    at = dist.confusion(dist.gap_middle())
    assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (2, 0, 0, 3)


def test_overlapping_scores_say_by_how_many_images_and_offer_no_gap_preset():
    # good 0.1, 0.5, 0.7; defective 0.4, 0.6, 0.9: from 0.4 to 0.7 they overlap; good 0.5 and 0.7 reach the
    # lowest defect (0.4), defects 0.4 and 0.6 lie under the highest good image (0.7)
    dist = ScoreDistribution.from_scores([0, 0, 0, 1, 1, 1], [0.1, 0.5, 0.7, 0.4, 0.6, 0.9])
    gap = dist.gap()
    assert (gap.highest_normal, gap.lowest_anomalous, gap.separated) == (0.7, 0.4, False)
    assert gap.width == pytest.approx(-0.3) and (gap.normal_above, gap.anomalous_below) == (2, 2)
    assert "gap_middle" not in dist.available_presets()
    with pytest.raises(ValueError, match="overlap"):
        dist.preset("gap_middle")
    tied = ScoreDistribution.from_scores([0, 1], [0.5, 0.5])      # a tie is an overlap, not a gap of zero
    assert not tied.gap().separated and (tied.gap().normal_above, tied.gap().anomalous_below) == (1, 1)


def test_a_binned_gap_never_claims_more_room_than_the_values_have():
    maps = np.array([[[0.0, 0.1], [0.2, 0.9]]], np.float32)
    masks = [np.array([[False, False], [False, True]])]
    dist = ScoreDistribution.from_maps(maps, masks, bins=9)      # edges every 0.1
    gap = dist.gap()
    assert gap.separated and gap.highest_normal >= 0.2 and gap.lowest_anomalous <= 0.9
    assert dist.confusion(dist.gap_middle())["fp"] == 0 and dist.confusion(dist.gap_middle())["fn"] == 0


def test_normal_only_offers_quantile_and_flags_nothing_above_all():
    dist = ScoreDistribution.from_scores(np.zeros(50, int), np.linspace(0, 1, 50))
    assert dist.available_presets() == ["normal_quantile"]
    assert dist.confusion(dist.normal_quantile(1.0))["fp"] == 0
    with pytest.raises(ValueError, match="both"):
        dist.f1_max()
    with pytest.raises(ValueError, match="anomalous"):
        dist.zero_miss()


def test_pixel_distribution_is_close_to_exact():
    rng = np.random.default_rng(2)
    maps = rng.random((12, 32, 32)).astype(np.float32)
    masks = [np.zeros((32, 32), bool) for _ in range(12)]
    for m, amap in zip(masks[6:], maps[6:]):
        m[8:16, 8:16] = True
        amap[8:16, 8:16] += 0.8
    masks.append(None)                                        # an anomalous image without a mask: left out
    maps = np.concatenate([maps, rng.random((1, 32, 32)).astype(np.float32) + 5])
    dist = ScoreDistribution.from_maps(maps, masks, bins=1024)
    flat_masks = np.concatenate([m.ravel() for m in masks[:12]])
    flat_maps = maps[:12].ravel()
    assert dist.n_anomalous == flat_masks.sum() and dist.n_normal == (~flat_masks).sum()
    assert dist.auroc() == pytest.approx(metrics.pixel_auroc(np.stack(masks[:12]), maps[:12]), abs=2e-3)
    exact = metrics.confusion_at(flat_masks.astype(int), flat_maps, dist.thresholds[300])
    assert dist.confusion(dist.thresholds[300]) == pytest.approx(exact)   # exact at bin edges
    assert dist.hist_normal.sum() == dist.n_normal and dist.hist_anomalous.sum() == dist.n_anomalous


def test_a_threshold_move_on_1000_scores_is_microseconds(scored):
    labels, scores = scored
    dist = ScoreDistribution.from_scores(labels, scores)
    start = time.process_time()
    for t in np.linspace(scores.min(), scores.max(), 1000):
        dist.confusion(t)
    assert (time.process_time() - start) / 1000 < 1e-3


def test_a_non_finite_score_is_never_ok_and_a_non_finite_threshold_is_refused():
    from core.detectors import Prediction
    from core.line.inspector import Inspector
    from core.thresholds import is_anomalous
    assert is_anomalous(np.nan, 1.0) and is_anomalous(np.inf, 1.0) and is_anomalous(-np.inf, 1.0)
    assert not is_anomalous(0.5, 1.0) and is_anomalous(1.0, 1.0)
    np.testing.assert_array_equal(is_anomalous(np.array([0.2, np.nan, 3.0]), 1.0), [False, True, True])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="finite"):
            is_anomalous(0.5, bad)

    class BrokenDetector:   # a computation gone wrong: the score is NaN
        def predict(self, images):
            return Prediction(np.array([np.nan]), [np.zeros((2, 2))])
    assert Inspector(BrokenDetector(), threshold=1.0).inspect(np.zeros((2, 2, 3), np.uint8)).label == "NG"


def test_a_model_holding_nan_is_refused_at_load_and_predict_refuses_a_nan_threshold(tmp_path, demo, capsys):
    from safetensors.torch import load_file, save_file
    from core.cli import main
    from core.detectors import create_detector, load_detector
    det = create_detector("patchcore", resize=64, coreset_ratio=0.1).fit(demo.subset(split="train")[:3])
    folder = det.save(tmp_path / "model")
    image = str(demo.subset(split="test").paths[0])
    assert main(["predict", "--model", str(folder), "--threshold", "nan", image]) == 2
    assert "finite" in capsys.readouterr().err
    tensors = load_file(folder / "fitted.safetensors")
    tensors["memory_bank"][3, 5] = float("nan")
    save_file(tensors, folder / "fitted.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite.*memory_bank|memory_bank.*NaN or infinite"):
        load_detector(folder)
    assert main(["predict", "--model", str(folder), "--threshold", "1.0", image]) == 2
    assert "damaged" in capsys.readouterr().err


# --- thresholds from good images alone -----------------------------------------------------------------
def test_rank_threshold_matches_the_hand_computed_order_statistic():
    from core.thresholds import normal_threshold
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 20.0))     # 1..19, shuffled
    t = normal_threshold(scores, 0.05)
    # k = ceil(20 * 0.95) = 19: the highest score; the rejected share is Beta(1, 19), mean 1/20.
    assert (t.method, t.rank, t.threshold) == ("rank", 19, 19.0)
    assert t.expected_rate == pytest.approx(0.05)
    assert t.upper_rate == pytest.approx(1 - 0.05 ** (1 / 19))              # Beta(1, 19) 95% quantile
    assert "19th lowest of 19" in t.describe()
    # One new good image: rejected with probability 1/20, so the 95% central interval of the count is 0..1.
    assert t.false_rejects_interval(1) == (0, 1)
    t = normal_threshold(np.arange(1.0, 100.0), 0.10)                       # k = ceil(100 * 0.9) = 90
    assert (t.rank, t.threshold) == (90, 90.0) and t.expected_rate == pytest.approx(0.10)


def test_rank_bound_holds_at_its_stated_confidence():
    """Coverage by simulation: over many calibration sets the real rejected share stays under the bound
    about 95% of the time (exact for any continuous score law)."""
    from scipy import stats

    from core.thresholds import normal_threshold
    rng = np.random.default_rng(3)
    within = [stats.expon.sf((t := normal_threshold(rng.exponential(size=40), 0.1)).threshold) <= t.upper_rate
              for _ in range(400)]
    assert 0.92 <= np.mean(within) <= 0.98


def test_tail_fit_extrapolates_below_one_over_n_and_bounds_by_the_highest_score():
    from scipy import stats

    from core.thresholds import normal_threshold
    scores = np.random.default_rng(1).exponential(size=2000)
    t = normal_threshold(scores, 1e-4)                                      # below 1 / 2001: no rank reaches it
    assert t.method == "tail fit" and t.n_tail == 400
    assert t.threshold == pytest.approx(-np.log(1e-4), rel=0.15)           # the exponential's true quantile
    assert t.upper_rate == pytest.approx(stats.beta(1, 2000).ppf(0.95))
    small = np.random.default_rng(2).normal(size=40)
    assert normal_threshold(small, 0.001).threshold >= small.max()         # never below the highest score


def test_normal_threshold_refuses_what_it_cannot_promise():
    from core.thresholds import normal_threshold
    with pytest.raises(ValueError, match="at least 30"):
        normal_threshold(np.arange(20.0), 0.01)                            # 1% from 20 images needs a tail
    with pytest.raises(ValueError, match="NaN"):
        normal_threshold([1.0, np.nan, 2.0], 0.5)
    with pytest.raises(ValueError, match="none"):
        normal_threshold([], 0.5)
    with pytest.raises(ValueError, match="false-reject rate"):
        normal_threshold([1.0, 2.0], 0.0)


def test_synthetic_miss_rate_counts_defects_scored_below_the_threshold():
    from core.thresholds import synthetic_miss_rate
    assert synthetic_miss_rate([1.0, 2.0, 3.0, 4.0], 3.0) == 0.5           # 3.0 is at the threshold: caught
    assert synthetic_miss_rate([1.0, np.nan], 5.0) == 0.5                   # a NaN score is never a pass

"""Threshold presets and everything a threshold slider shows, precomputed once per run.

A :class:`ScoreDistribution` holds, for every candidate threshold, how many normal and anomalous values
lie at or above it (``score >= threshold`` means anomalous, as in :mod:`core.metrics`). Built once, it
answers the confusion counts at any threshold with one binary search, so moving a slider costs
microseconds however many images or pixels there are; the ROC and precision-recall curves and the
presets come from the same counts.

Image scores are few, so their distribution is exact (one candidate per distinct score) and agrees with
:func:`core.metrics.confusion_at`, :func:`~core.metrics.roc_points` and :func:`~core.metrics.f1_max`.
Pixels are many (a thousand 224 x 224 maps are 50 million values), so their distribution is binned
into fine histogram bins: its answers are exact at bin edges and off by at most one bin in between.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PIXEL_BINS = 4096


def check_threshold(threshold: float, what: str = "threshold") -> float:
    """The threshold as a float; NaN or an infinity is refused (a NaN comparison would pass every part)."""
    value = float(threshold)
    if not np.isfinite(value):
        raise ValueError(f"the {what} must be a finite number, not {threshold!r}")
    return value


def is_anomalous(scores, threshold: float):
    """The one decision rule: anomalous (NG) when ``score >= threshold``, and whenever a score is not a
    finite number, so that a broken computation can never let a part pass. Works on floats and arrays."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged = ~np.isfinite(scores) | (scores >= check_threshold(threshold))
    return bool(flagged) if flagged.ndim == 0 else flagged

def verdict(scores, threshold: float, review: float | None = None):
    """"NG" at or above the image threshold (and for any score that is not a finite number), "review" from
    the review threshold up to it, "OK" below: one string for a score, an array of them for an array. A
    review threshold at or above the image threshold leaves two bands."""
    ng = is_anomalous(scores, threshold)
    out = np.where(ng, "NG", "OK").astype(object)
    if review is not None and check_threshold(review, "review threshold") < threshold:
        out[np.asarray(is_anomalous(scores, review)) & ~np.asarray(ng)] = "review"
    return out.item() if out.ndim == 0 else out


# How each preset is shown to users; the keys are what the run registry stores as `threshold_preset`.
PRESET_LABELS = {
    "f1_max": "F1-max on the test set",
    "target_fpr": "Target false-positive rate",
    "zero_miss": "Zero missed defects on the test set",
    "normal_quantile": "Quantile of normal scores",
    "false_reject_rate": "Target false-reject rate, from held-out good images",
    "gap_middle": "Middle of the gap between good and defective scores",
    "manual": "Manual (moved by hand)",
}

# The normal-only threshold's default target (the share of good parts sent to NG), and its confidence level.
DEFAULT_FALSE_REJECT = 0.01
CONFIDENCE = 0.95
# The tail fit: the highest share of the calibration scores it models, the fewest of them, and the fewest
# calibration images it is tried on at all.
TAIL_SHARE = 0.2
MIN_TAIL = 8
MIN_TAIL_IMAGES = 30


@dataclass(frozen=True)
class NormalThreshold:
    """A threshold set from good images alone, with what it promises.

    ``expected_rate`` is the false-reject rate expected on new good parts like the calibration images;
    ``upper_rate`` the rate it stays under with probability ``confidence``. ``method`` is "rank" (an order
    statistic of the calibration scores: exact for any score distribution) or "tail fit" (a generalized
    Pareto tail, for rates below 1 / (n + 1) that no rank reaches: its expected rate is an extrapolation,
    its bound still exact).
    """
    threshold: float
    target_rate: float
    expected_rate: float
    upper_rate: float
    confidence: float
    n_images: int
    method: str
    rank: int | None = None          # the calibration score used as threshold, 1 = lowest ("rank" only)
    n_tail: int | None = None        # scores the tail was fitted on ("tail fit" only)

    def describe(self) -> str:
        how = (f"the {_ordinal(self.rank)} lowest of {self.n_images} held-out good images' scores" if self.method == "rank"
               else f"a tail fitted to the {self.n_tail} highest of {self.n_images} held-out good images' scores "
                    "(an extrapolation)")
        expects = "expects" if self.method == "rank" else "extrapolates to"
        return (f"{expects} {self.expected_rate:.2%} of good parts rejected, at most {self.upper_rate:.2%} with "
                f"{self.confidence:.0%} confidence; {how}")

    def false_rejects_interval(self, m: int, level: float = CONFIDENCE) -> tuple[int, int]:
        """The central `level` interval of the number of good images rejected among `m` new ones ("rank":
        the beta-binomial predictive law, exact for exchangeable scores; "tail fit": that of the highest
        calibration score, an upper end only)."""
        from scipy import stats
        tail = (1 - level) / 2
        if self.method == "rank":
            law = stats.betabinom(m, self.n_images + 1 - self.rank, self.rank)
            return int(law.ppf(tail)), int(law.ppf(1 - tail))
        return 0, int(stats.betabinom(m, 1, self.n_images).ppf(1 - tail))


def normal_threshold(scores, false_reject_rate: float = DEFAULT_FALSE_REJECT,
                     confidence: float = CONFIDENCE) -> NormalThreshold:
    """The threshold that rejects a share `false_reject_rate` of good parts, from good images' scores alone.

    Rank: with n calibration scores, the k-th lowest as threshold leaves a rejected share R of new good parts
    distributed Beta(n + 1 - k, k) whatever the score distribution (conformal prediction's argument), so
    k = ceil((n + 1)(1 - rate)) is the lowest threshold whose expected R is within the target, and the
    Beta quantile bounds R. Rates below 1 / (n + 1) need k > n: then a generalized Pareto distribution is
    fitted to the top scores (peaks over threshold) and extrapolated to the rate. Such extrapolations run
    optimistic on a few dozen scores (simulated on normal, log-normal and Gumbel scores, 64 of them: 1.6% real
    for 1% asked), so the stated bound is not the fit's but the distribution-free one of the highest score,
    which the threshold never goes below.
    """
    from scipy import stats
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rate, confidence = float(false_reject_rate), float(confidence)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError("a threshold from good images needs their scores; there are none")
    if not np.isfinite(scores).all():
        raise ValueError("the good images' scores hold NaN or infinite values: the model is broken, not calibrated")
    if not 0 < rate < 1 or not 0.5 <= confidence < 1:
        raise ValueError(f"the false-reject rate must be in (0, 1) and the confidence in [0.5, 1), got {rate!r} "
                         f"and {confidence!r}")
    n = scores.size
    k = int(np.ceil((n + 1) * (1 - rate) - 1e-9))
    if k <= n:
        k = max(k, 1)
        law = stats.beta(n + 1 - k, k)
        return NormalThreshold(float(scores[k - 1]), rate, float(law.mean()), float(law.ppf(confidence)),
                               confidence, n, "rank", rank=k)
    if n < MIN_TAIL_IMAGES:
        raise ValueError(f"a false-reject rate of {rate:.2%} is below what {n} good images can show "
                         f"(1 in {n + 1}); a tail fit needs at least {MIN_TAIL_IMAGES}: hold out more good images "
                         "or aim at a higher rate")
    n_tail = max(MIN_TAIL, int(np.ceil(TAIL_SHARE * n)))
    # At or above the highest score, the rate is bounded by that score's exact law Beta(1, n).
    threshold = max(_tail_quantile(scores, n_tail, rate), float(scores[-1]))
    return NormalThreshold(threshold, rate, rate, float(stats.beta(1, n).ppf(confidence)), confidence, n,
                           "tail fit", n_tail=n_tail)


def _tail_fit(sorted_scores: np.ndarray, n_tail: int) -> tuple[float, float, float]:
    """(u, shape, scale): the generalized Pareto law (scipy's parametrisation) of the excesses over u, the
    (n_tail + 1)-th highest score, by probability-weighted moments (Hosking and Wallis, 1987): closed form,
    and steadier than maximum likelihood on the few excesses a calibration set has."""
    u = sorted_scores[-n_tail - 1]
    excess = sorted_scores[-n_tail:] - u                     # ascending
    plotting = (np.arange(1, n_tail + 1) - 0.35) / n_tail
    a0, a1 = excess.mean(), np.mean((1 - plotting) * excess)
    if a0 <= 0 or a0 <= 2 * a1:                              # tied scores: no spread to fit
        return float(u), 0.0, max(float(a0), 1e-12)
    k = a0 / (a0 - 2 * a1) - 2                               # Hosking's shape; scipy's is its negative
    return float(u), float(-k), max(float(2 * a0 * a1 / (a0 - 2 * a1)), 1e-12)


def _tail_quantile(sorted_scores: np.ndarray, n_tail: int, rate: float) -> float:
    from scipy import stats
    u, shape, scale = _tail_fit(sorted_scores, n_tail)
    # P(S > u + y) = (n_tail / n) * (1 - G(y)); solve for the y where it equals the rate.
    return float(u + stats.genpareto.ppf(1 - rate * sorted_scores.size / n_tail, shape, scale=scale))


def synthetic_miss_rate(synthetic_scores, threshold: float) -> float:
    """The share of synthetic defects the threshold lets pass (scored below it): an estimate of misses
    before any real defect has been seen, only as good as the synthetic defects resemble real ones."""
    synthetic = np.asarray(synthetic_scores, dtype=np.float64)
    return float(np.mean(~is_anomalous(synthetic, threshold))) if synthetic.size else float("nan")


@dataclass(frozen=True)
class ScoreGap:
    """Where the normal and the anomalous values meet.

    ``highest_normal`` and ``lowest_anomalous`` are the extremes (for a binned distribution, the bin edges on
    their outer side, so a gap is never claimed that the values do not have). They are separated when the
    lowest anomalous value is above the highest normal one; otherwise ``normal_above`` normal values reach
    the lowest anomalous one and ``anomalous_below`` anomalous values lie at or under the highest normal one.
    """
    highest_normal: float
    lowest_anomalous: float
    normal_above: int
    anomalous_below: int

    @property
    def separated(self) -> bool:
        return self.lowest_anomalous > self.highest_normal

    @property
    def width(self) -> float:
        """The gap's width; negative: how far the two overlap."""
        return self.lowest_anomalous - self.highest_normal

    @property
    def middle(self) -> float:
        return (self.highest_normal + self.lowest_anomalous) / 2


@dataclass(frozen=True)
class ScoreDistribution:
    """Counts of normal and anomalous values at or above each candidate threshold.

    ``thresholds`` ascend; ``n_anomalous_at[i]`` and ``n_normal_at[i]`` count the values
    ``>= thresholds[i]``. Both count arrays carry one extra final entry, 0, for a threshold above
    every value. ``hist_edges`` / ``hist_normal`` / ``hist_anomalous`` are a coarse histogram for plots.
    """
    thresholds: np.ndarray
    n_anomalous_at: np.ndarray
    n_normal_at: np.ndarray
    hist_edges: np.ndarray
    hist_normal: np.ndarray
    hist_anomalous: np.ndarray
    exact: bool

    @classmethod
    def from_scores(cls, labels, scores, hist_bins: int = 40) -> "ScoreDistribution":
        """Exact distribution of image scores; labels are 0 (normal) and 1 (anomalous)."""
        labels = np.asarray(labels).astype(bool)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != labels.shape or scores.ndim != 1 or scores.size == 0:
            raise ValueError(f"need equally long 1-D labels and scores, got {labels.shape} and {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError("scores must be finite")
        values, inverse = np.unique(scores, return_inverse=True)
        anomalous = np.bincount(inverse[labels], minlength=values.size)
        normal = np.bincount(inverse[~labels], minlength=values.size)
        edges = _hist_edges(values[0], values[-1], hist_bins)
        return cls(values, _counts_at_or_above(anomalous), _counts_at_or_above(normal), edges,
                   np.histogram(scores[~labels], edges)[0], np.histogram(scores[labels], edges)[0], exact=True)

    @classmethod
    def from_maps(cls, maps, masks, bins: int = PIXEL_BINS, hist_bins: int = 40) -> "ScoreDistribution":
        """Binned distribution of map pixels; ``masks[i]`` None leaves image i out (no ground truth)."""
        kept = [i for i in range(len(maps)) if masks[i] is not None]
        if not kept:
            raise ValueError("no image has a ground-truth mask (normal images count as all-zero masks)")
        lo = min(float(np.min(maps[i])) for i in kept)
        hi = max(float(np.max(maps[i])) for i in kept)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        anomalous = np.zeros(bins, dtype=np.int64)
        normal = np.zeros(bins, dtype=np.int64)
        for i in kept:   # one image at a time: no 50-million-value temporary
            values = np.asarray(maps[i], dtype=np.float32).ravel()
            mask = np.asarray(masks[i], dtype=bool).ravel()
            anomalous += np.histogram(values[mask], edges)[0]
            normal += np.histogram(values[~mask], edges)[0]
        # The plot histogram merges fine bins, so it needs no second pass over the pixels.
        group = max(1, bins // hist_bins)
        coarse = edges[::group] if edges[::group][-1] == edges[-1] else np.append(edges[::group], edges[-1])
        n_coarse = coarse.size - 1
        return cls(edges[:-1], _counts_at_or_above(anomalous), _counts_at_or_above(normal), coarse,
                   np.add.reduceat(normal, np.arange(0, bins, group))[:n_coarse],
                   np.add.reduceat(anomalous, np.arange(0, bins, group))[:n_coarse], exact=False)

    # -- totals and range ------------------------------------------------------------------------
    @property
    def n_anomalous(self) -> int:
        return int(self.n_anomalous_at[0])

    @property
    def n_normal(self) -> int:
        return int(self.n_normal_at[0])

    @property
    def has_both_classes(self) -> bool:
        return self.n_anomalous > 0 and self.n_normal > 0

    @property
    def lowest(self) -> float:
        return float(self.thresholds[0])

    @property
    def highest(self) -> float:
        return float(self.hist_edges[-1])

    # -- at one threshold ------------------------------------------------------------------------
    def confusion(self, threshold: float) -> dict:
        """tp, fp, tn, fn and precision, recall, fpr, f1, accuracy, as :func:`core.metrics.confusion_at`."""
        i = int(np.searchsorted(self.thresholds, threshold, side="left"))
        tp, fp = int(self.n_anomalous_at[i]), int(self.n_normal_at[i])
        fn, tn = self.n_anomalous - tp, self.n_normal - fp
        total = tp + fp + tn + fn
        return {"tp": tp, "fp": fp, "tn": tn, "fn": fn,
                "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "fpr": _ratio(fp, fp + tn),
                "f1": _ratio(2 * tp, 2 * tp + fp + fn), "accuracy": _ratio(tp + tn, total)}

    # -- curves ----------------------------------------------------------------------------------
    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) from (0, 0) to (1, 1), one point per candidate threshold."""
        fpr = self.n_normal_at[::-1] / max(self.n_normal, 1)
        tpr = self.n_anomalous_at[::-1] / max(self.n_anomalous, 1)
        return fpr, tpr

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at every threshold that flags something, recall ascending."""
        tp, fp = self.n_anomalous_at[:-1][::-1], self.n_normal_at[:-1][::-1]
        flagged = tp + fp
        keep = flagged > 0
        return tp[keep] / max(self.n_anomalous, 1), tp[keep] / flagged[keep]

    def auroc(self) -> float:
        fpr, tpr = self.roc()
        return float(np.trapezoid(tpr, fpr))

    # -- presets ---------------------------------------------------------------------------------
    def f1_max(self) -> float:
        """The threshold with the best F1 (the highest one among ties: it flags the fewest)."""
        self._need_both("F1-max")
        tp, fp = self.n_anomalous_at[:-1], self.n_normal_at[:-1]
        f1 = 2 * tp / (2 * tp + fp + (self.n_anomalous - tp))
        return float(self.thresholds[len(f1) - 1 - int(np.argmax(f1[::-1]))])

    def target_fpr(self, fpr: float) -> float:
        """The lowest threshold that flags at most a fraction ``fpr`` of the normal values."""
        if not 0 <= fpr <= 1:
            raise ValueError(f"target false-positive rate must be in [0, 1], got {fpr}")
        if self.n_normal == 0:
            raise ValueError("a false-positive rate needs normal values")
        allowed = np.floor(fpr * self.n_normal + 1e-9)
        i = int(np.argmax(self.n_normal_at <= allowed))   # counts fall as thresholds rise
        return float(self.thresholds[i]) if i < self.thresholds.size else self._above_all()

    def zero_miss(self) -> float:
        """The highest threshold that still flags every anomalous value."""
        if self.n_anomalous == 0:
            raise ValueError("zero missed defects needs anomalous values")
        i = int(np.flatnonzero(self.n_anomalous_at == self.n_anomalous)[-1])
        return float(self.thresholds[i])

    def normal_quantile(self, q: float) -> float:
        """The lowest threshold above a fraction ``q`` of the normal values.

        This is the preset for a new line with no defect images yet: it needs normal values only.
        It equals ``target_fpr(1 - q)``; the two are worded for different questions.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        return self.target_fpr(1 - q)

    def gap(self) -> ScoreGap:
        """The gap (or the overlap) between the normal and the anomalous values."""
        self._need_both("A gap between normal and anomalous values")
        normal = self.n_normal_at[:-1] - self.n_normal_at[1:]             # values per candidate threshold
        anomalous = self.n_anomalous_at[:-1] - self.n_anomalous_at[1:]
        top = int(np.flatnonzero(normal)[-1])
        bottom = int(np.flatnonzero(anomalous)[0])
        # A bin's values lie between its lower edge (its threshold) and the next bin's.
        upper_edges = self.thresholds if self.exact else np.append(self.thresholds[1:], self.highest)
        return ScoreGap(float(upper_edges[top]), float(self.thresholds[bottom]),
                        normal_above=int(self.n_normal_at[bottom]),
                        anomalous_below=self.n_anomalous - int(self.n_anomalous_at[top + 1]))

    def gap_middle(self) -> float:
        """The threshold halfway between the highest normal and the lowest anomalous value: every anomalous
        value flagged, no normal one, with the most room on both sides."""
        gap = self.gap()
        if not gap.separated:
            raise ValueError(f"normal and anomalous values overlap ({gap.normal_above} normal at or above the lowest "
                             f"anomalous one, {gap.anomalous_below} anomalous at or under the highest normal one): "
                             "there is no gap to put the threshold in")
        return gap.middle

    def preset(self, name: str, value: float | None = None) -> float:
        """Dispatch by preset name; ``value`` is the FPR for target_fpr and q for normal_quantile."""
        if name == "f1_max":
            return self.f1_max()
        if name == "gap_middle":
            return self.gap_middle()
        if name == "zero_miss":
            return self.zero_miss()
        if name == "target_fpr":
            return self.target_fpr(0.01 if value is None else value)
        if name == "normal_quantile":
            return self.normal_quantile(0.99 if value is None else value)
        raise KeyError(f"unknown threshold preset {name!r}; known: {', '.join(PRESET_LABELS)}")

    def available_presets(self) -> list[str]:
        """Presets that make sense for these values (F1 and zero-miss need anomalous ones, the gap's middle a
        gap)."""
        out = []
        if self.has_both_classes:
            out += ["f1_max", "target_fpr", "zero_miss"] + (["gap_middle"] if self.gap().separated else [])
        if self.n_normal:
            out.append("normal_quantile")
        return out

    def _need_both(self, what: str) -> None:
        if not self.has_both_classes:
            raise ValueError(f"{what} needs both normal and anomalous values")

    def _above_all(self) -> float:
        top = float(self.hist_edges[-1])
        return float(np.nextafter(top, np.inf)) if self.exact else top


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _counts_at_or_above(per_value: np.ndarray) -> np.ndarray:
    return np.append(np.cumsum(per_value[::-1])[::-1], 0).astype(np.int64)


def _hist_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-3
    return np.linspace(lo, hi, bins + 1)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0

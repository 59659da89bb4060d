"""Shared plotly figures: the incremental threshold plots match freshly built ones, and move fast."""
import time

import numpy as np

from core.app import figures
from core.thresholds import ScoreDistribution
from core.app.viz import colour_lut


def distribution(n=1000):
    rng = np.random.default_rng(0)
    labels = (rng.random(n) < 0.3).astype(int)
    return ScoreDistribution.from_scores(labels, np.where(labels, rng.normal(2, 0.5, n), rng.normal(1, 0.3, n)))


def test_moving_the_marks_draws_what_building_afresh_draws():
    dist = distribution()
    plots = figures.ThresholdFigures(dist)
    for t in (0.7, 1.3, 2.4):
        at = plots.at(t)
        assert at == dist.confusion(t)
        for moved, fresh in ((plots.roc, figures.roc_figure(dist, t)), (plots.pr, figures.pr_figure(dist, t)),
                             (plots.histogram, figures.histogram_figure(dist, t)),
                             (plots.confusion, figures.confusion_figure(at))):
            assert moved.to_dict() == fresh.to_dict()


def test_a_threshold_move_for_1000_images_redraws_in_milliseconds():
    plots = figures.ThresholdFigures(distribution())
    start = time.process_time()
    for t in np.linspace(0.5, 2.5, 20):
        plots.at(t)
        for fig in (plots.roc, plots.pr, plots.histogram, plots.confusion):
            fig.to_dict()                      # what st.plotly_chart serialises
    assert (time.process_time() - start) / 20 < 0.1


def test_colour_legend_uses_the_heatmaps_lookup_table():
    fig = figures.colourbar_figure(0.0, 10.0, image_threshold=6.0, pixel_threshold=5.0)
    strip = np.asarray(fig.data[0].z)
    assert (strip[0, 0] == colour_lut()[0]).all() and (strip[0, -1] == colour_lut()[-1]).all()
    assert {a.text for a in fig.layout.annotations} == {"image threshold", "pixel threshold"}

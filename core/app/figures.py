"""Plotly figures shared by the dashboard and the HTML report, so both show the same pictures.

Functions take precomputed data (a :class:`~core.thresholds.ScoreDistribution`, tables) and only draw;
none computes a metric. Colours: normal green, anomalous red, the threshold orange, maps in
:data:`core.app.viz.COLORSCALE`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..thresholds import ScoreDistribution
from .viz import COLORSCALE, colourise

NORMAL, ANOMALOUS, THRESHOLD, NEUTRAL = "#2ca02c", "#d62728", "#ff7f0e", "#7f7f7f"
_MARGIN = dict(l=10, r=10, t=40, b=10)


def _layout(fig: go.Figure, title: str, height: int = 320, **kw) -> go.Figure:
    kw.setdefault("margin", _MARGIN)
    fig.update_layout(title=dict(text=title, x=0, font=dict(size=14)), height=height, template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1), **kw)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def roc_figure(dist: ScoreDistribution, threshold: float, what: str = "images") -> go.Figure:
    fpr, tpr = dist.roc()
    at = dist.confusion(threshold)
    fig = go.Figure([
        go.Scatter(x=fpr, y=tpr, mode="lines", name=f"ROC (AUROC {dist.auroc():.3f})", line=dict(color=NEUTRAL)),
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#cccccc"), showlegend=False,
                   hoverinfo="skip"),
        go.Scatter(x=[at["fpr"]], y=[at["recall"]], mode="markers", name="threshold",
                   marker=dict(size=13, color=THRESHOLD, line=dict(width=1, color="black"))),
    ])
    return _layout(fig, f"ROC curve ({what})", xaxis=dict(title="false-positive rate", range=[-0.02, 1.02]),
                   yaxis=dict(title="true-positive rate (recall)", range=[-0.02, 1.02]))


def pr_figure(dist: ScoreDistribution, threshold: float, what: str = "images") -> go.Figure:
    recall, precision = dist.precision_recall()
    at = dist.confusion(threshold)
    fig = go.Figure([
        go.Scatter(x=recall, y=precision, mode="lines", name="precision-recall", line=dict(color=NEUTRAL)),
        go.Scatter(x=[at["recall"]], y=[at["precision"]], mode="markers", name="threshold",
                   marker=dict(size=13, color=THRESHOLD, line=dict(width=1, color="black"))),
    ])
    return _layout(fig, f"Precision-recall ({what})", xaxis=dict(title="recall", range=[-0.02, 1.02]),
                   yaxis=dict(title="precision", range=[-0.02, 1.02]))


def histogram_figure(dist: ScoreDistribution, threshold: float, what: str = "images",
                     unit: str = "anomaly score") -> go.Figure:
    edges = dist.hist_edges
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure()
    for counts, name, colour in ((dist.hist_normal, f"normal {what}", NORMAL),
                                 (dist.hist_anomalous, f"anomalous {what}", ANOMALOUS)):
        if counts.sum():
            fig.add_bar(x=centres, y=counts, width=width, name=name, marker_color=colour, opacity=0.6)
    fig.add_vline(x=threshold, line=dict(color=THRESHOLD, width=3), annotation_text="threshold",
                  annotation_position="top")
    return _layout(fig, f"Score distribution ({what})", barmode="overlay",
                   xaxis=dict(title=unit), yaxis=dict(title=f"{what}", type="log" if what == "pixels" else None))


def tradeoff_figure(synthetic: ScoreDistribution, threshold: float,
                    test: ScoreDistribution | None = None) -> go.Figure:
    """Defects missed against good images rejected at every threshold: estimated from the held-out good
    images and their synthetic defects, and measured on the test set where it has real defects."""
    fig = go.Figure()
    curves = [(synthetic, "estimated from synthetic defects", "dash")]
    if test is not None and test.has_both_classes:
        curves.append((test, "measured on the test set", "solid"))
    for dist, name, dash in curves:
        rejected, caught = dist.roc()
        at = dist.confusion(threshold)
        fig.add_scatter(x=rejected, y=1 - caught, mode="lines", name=name, line=dict(color=NEUTRAL, dash=dash))
        fig.add_scatter(x=[at["fpr"]], y=[1 - at["recall"]], mode="markers", showlegend=False, hoverinfo="x+y",
                        marker=dict(size=13, color=THRESHOLD, line=dict(width=1, color="black")))
    return _layout(fig, "Defects missed vs good parts rejected",
                   xaxis=dict(title="good images rejected", range=[-0.02, 1.02]),
                   yaxis=dict(title="defects missed", range=[-0.02, 1.02]))


def _confusion_text(confusion: dict) -> list[list[str]]:
    counts = [[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]]
    names = [["true negatives", "false positives"], ["missed defects", "caught defects"]]
    return [[f"{counts[r][c]:,}<br>{names[r][c]}" for c in range(2)] for r in range(2)]


def confusion_figure(confusion: dict, what: str = "images") -> go.Figure:
    """The 2x2 confusion matrix; rows are the truth, columns the prediction."""
    colours = [[0, 1], [1, 0]]   # wrong answers are the ones to look at
    fig = go.Figure(go.Heatmap(z=colours, x=["predicted OK", "predicted NG"], y=["normal", "anomalous"],
                               text=_confusion_text(confusion), texttemplate="%{text}", textfont=dict(size=15),
                               showscale=False,
                               colorscale=[[0, "#e8f4e8"], [1, "#fbe3e3"]], hoverinfo="skip", xgap=3, ygap=3))
    return _layout(fig, f"Confusion matrix ({what})", height=260, yaxis=dict(autorange="reversed"))


class ThresholdFigures:
    """The threshold plots of one distribution, built once; :meth:`at` only moves the threshold marks.

    Building a plotly figure costs tens of milliseconds, moving a marker a fraction of one, so a slider
    redraws in time however many images there are. The figures are mutated in place: keep one instance
    per user session, never share one between sessions.
    """

    def __init__(self, dist: ScoreDistribution, what: str = "images"):
        self.dist = dist
        start = dist.lowest
        at = dist.confusion(start)
        self.roc = roc_figure(dist, start, what) if dist.has_both_classes else None
        self.pr = pr_figure(dist, start, what) if dist.has_both_classes else None
        self.histogram = histogram_figure(dist, start, what)
        self.confusion = confusion_figure(at, what)

    def at(self, threshold: float) -> dict:
        """The confusion counts at `threshold`, with every figure's marks moved there."""
        at = self.dist.confusion(threshold)
        if self.roc is not None:
            self.roc.data[-1].update(x=[at["fpr"]], y=[at["recall"]])        # the marker is the last trace
            self.pr.data[-1].update(x=[at["recall"]], y=[at["precision"]])
        self.histogram.layout.shapes[0].update(x0=threshold, x1=threshold)   # the vline and its label
        self.histogram.layout.annotations[0].update(x=threshold)
        self.confusion.data[0].update(text=_confusion_text(at))
        return at


def colourbar_figure(vmin: float, vmax: float, image_threshold: float | None = None,
                     pixel_threshold: float | None = None) -> go.Figure:
    """The run's colour scale as a horizontal bar, with the thresholds marked on it.

    The bar is drawn from :func:`core.app.viz.colourise`, the very lookup table the heatmaps use, so the legend
    cannot drift from the images.
    """
    step = (vmax - vmin) / 256
    strip = colourise(np.linspace(vmin, vmax, 256)[None, :].repeat(2, axis=0), vmin, vmax)
    fig = go.Figure(go.Image(z=strip, x0=vmin + step / 2, dx=step, y0=0.25, dy=0.5,
                             hovertemplate="%{x:.3g}<extra></extra>"))
    # Two label rows above the bar, so nearby thresholds do not print over each other.
    for value, label, shift in ((pixel_threshold, "pixel threshold", 0), (image_threshold, "image threshold", 14)):
        if value is not None:
            x = min(max(value, vmin), vmax)
            fig.add_vline(x=x, line=dict(color="white", width=3, dash="dash"))
            fig.add_annotation(x=x, y=1.0, yref="paper", yshift=shift, text=label, showarrow=False,
                               font=dict(size=11), yanchor="bottom")
    fig.update_yaxes(visible=False, scaleanchor=False, range=[-0.2, 1.2])
    fig.update_xaxes(title="anomaly score (one scale for every image of this run)", range=[vmin, vmax])
    return _layout(fig, "", height=160, margin=dict(l=10, r=10, t=36, b=10))


def coverage_figure(radii: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Scatter(x=np.arange(1, len(radii) + 1), y=radii, mode="lines", line=dict(color=ANOMALOUS),
                               name="coverage radius"))
    return _layout(fig, "Coreset coverage: the farthest training patch from the coreset",
                   xaxis=dict(title="coreset size (patches picked)"),
                   yaxis=dict(title="coverage radius (projected distance)", type="log"))


def bank_figure(bank: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for kind, colour, size in (("training patch", "#c7c7c7", 4), ("coreset", ANOMALOUS, 5)):
        part = bank[bank["kind"] == kind]
        fig.add_scattergl(x=part["x"], y=part["y"], mode="markers", name=f"{kind} ({len(part):,})",
                          marker=dict(color=colour, size=size, opacity=0.7), hoverinfo="skip")
    return _layout(fig, "Memory bank: training patches and the coreset kept (PCA)", height=420,
                   xaxis=dict(title="PC 1"), yaxis=dict(title="PC 2"))


def embedding_figure(table: pd.DataFrame, colour: str, title: str, hover: list[str]) -> go.Figure:
    """Scatter of a view table coloured by a column (continuous for 'score', categories otherwise)."""
    fig = go.Figure()
    custom = np.arange(len(table))
    template = "<br>".join(f"{c}: %{{customdata[{k + 1}]}}" for k, c in enumerate(hover)) + "<extra></extra>"
    data = np.column_stack([custom, *[table[c].astype(str) if c != "score" else table[c].round(2) for c in hover]])
    if colour == "score":
        fig.add_scattergl(x=table["x"], y=table["y"], mode="markers", customdata=data, hovertemplate=template,
                          marker=dict(color=table["score"], colorscale=COLORSCALE, size=7, showscale=True,
                                      colorbar=dict(title="score")), name="")
    else:
        colour_map = {"good": NORMAL, "train": "#1f77b4", "test": THRESHOLD, "True": ANOMALOUS, "False": NORMAL}
        names = {"True": "inside a defect", "False": "outside defects"}   # boolean columns, in words
        for value in sorted(table[colour].astype(str).unique()):
            part = (table[colour].astype(str) == value).to_numpy()
            fig.add_scattergl(x=table["x"][part], y=table["y"][part], mode="markers", name=names.get(value, value),
                              customdata=data[part], hovertemplate=template,
                              marker=dict(size=7, color=colour_map.get(value)))
    return _layout(fig, title, height=460, xaxis=dict(title="UMAP 1"), yaxis=dict(title="UMAP 2"))


def compare_figure(table: pd.DataFrame, metrics: list[str]) -> go.Figure:
    """Grouped bars of metrics per run (table rows are runs, labelled by its 'run' column), oldest run on the left.
    The metrics are shares, so the axis is 0 to 1 whatever the values."""
    fig = go.Figure()
    runs = table.iloc[::-1]
    for metric in metrics:
        if metric in runs and runs[metric].notna().any():
            fig.add_bar(x=runs["run"], y=runs[metric], name=metric, hovertemplate="%{x}<br>%{y:.3f}")
    return _layout(fig, "Metrics per run", barmode="group", xaxis=dict(title="run", type="category"),
                   yaxis=dict(title="metric on the test set (1 is best)", range=[0, 1.05]))


def latency_figure(table: pd.DataFrame) -> go.Figure:
    """Speed against accuracy: each run a point, bubble size the model size. Time starts at zero, so distances
    are ratios; AUROC runs up to its best, 1."""
    fig = go.Figure(go.Scatter(
        x=table["ms per image"], y=table["image AUROC"], mode="markers+text", text=table["run"],
        textposition="top center", marker=dict(size=12 + 3 * np.sqrt(table["model MB"].fillna(0)), color=NEUTRAL),
        hovertemplate="%{text}<br>%{x:.1f} ms/image<br>image AUROC %{y:.3f}<extra></extra>"))
    slowest, worst = table["ms per image"].max(), table["image AUROC"].min()
    x_top = 1.15 * slowest if pd.notna(slowest) and slowest > 0 else 1.0
    y_bottom = max(0.0, float(worst) - 0.05) if pd.notna(worst) else 0.0
    return _layout(fig, "Speed and accuracy (bubble size: model size)",
                   xaxis=dict(title="ms per image (test set, this machine)", range=[0, x_top]),
                   yaxis=dict(title="image AUROC", range=[min(y_bottom, 0.95), 1.02]))


# Invisible points under an image make box and lasso selection work on it (an image trace is not selectable).
ROI_GRID = 40


def roi_figure(picture: np.ndarray, image_hw: tuple[int, int]) -> go.Figure:
    """A picture of an image (any size) on axes in the image's own pixels, for drawing a region of interest
    with box or lasso selection."""
    h, w = image_hw
    fig = go.Figure(go.Image(z=picture, dx=w / picture.shape[1], dy=h / picture.shape[0], hoverinfo="skip"))
    ys, xs = np.meshgrid(np.linspace(0, h - 1, ROI_GRID), np.linspace(0, w - 1, ROI_GRID), indexing="ij")
    fig.add_trace(go.Scatter(x=xs.ravel(), y=ys.ravel(), mode="markers", marker={"opacity": 0, "size": 4},
                             hoverinfo="skip", showlegend=False))
    fig.update_xaxes(range=[0, w], showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(range=[h, 0], showgrid=False, zeroline=False, scaleanchor="x")
    fig.update_layout(dragmode="select", height=480, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


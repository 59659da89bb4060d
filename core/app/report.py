"""A run's results for stakeholders: one self-contained HTML file (metrics, curves, threshold, worst images and
the borderline ones on both sides of the threshold).

Everything is inline: plotly.js once in the head, the curves as plotly figures (the same ones the dashboard
shows, from :mod:`core.app.figures`) and the images as base64 PNGs, so the file opens offline and can be mailed.
"""
from __future__ import annotations

import datetime as dt
import html
import json

import numpy as np
from plotly.offline import get_plotlyjs

from . import figures
from .compare import run_label
from .render import data_uri, heatmap_panel, region_panel
from ..files import json_default
from ..results import RunResults
from ..rules import Decision, DefectRules
from ..thresholds import PRESET_LABELS, is_anomalous

WORST_IMAGES = 6
BORDERLINE_IMAGES = 4     # on each side of the threshold

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } .sub { color: #666; margin-top: 0; }
table.metrics { border-collapse: collapse; margin: 1rem 0; }
table.metrics td, table.metrics th { border-bottom: 1px solid #ddd; padding: 0.35rem 1.2rem 0.35rem 0; text-align: left; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.card { border: 1px solid #e3e3e3; border-radius: 8px; padding: 0.8rem; margin-bottom: 1rem; }
.card img { width: 32%; margin-right: 1%; border-radius: 4px; }
.ng { color: #c62828; font-weight: 700; } .ok { color: #2e7d32; font-weight: 700; }
.review { color: #ef6c00; font-weight: 700; }
.verdict { font-size: 1.15rem; padding: 0.8rem 1rem; background: #f6f8fa; border-radius: 8px; }
details pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
"""


def build_report(run: dict, results: RunResults, image_threshold: float, pixel_threshold: float | None = None,
                 preset: str | None = None, worst: int = WORST_IMAGES, review: float | None = None,
                 rules: DefectRules | None = None) -> str:
    """The HTML text. ``run`` is a registry row (:meth:`core.runs.RunStore.get_run`); ``review`` the lower end
    of a review band below the image threshold, if there is one; ``rules`` the run's defect rules."""
    pixel_threshold = image_threshold if pixel_threshold is None else pixel_threshold
    decisions = [results.decide(i, image_threshold, review, pixel_threshold, rules) for i in range(len(results))]
    image_dist = results.image_distribution()
    pixel_dist = results.pixel_distribution()
    at = image_dist.confusion(image_threshold)
    scale = results.colour_scale()
    parts = [f"<h1>{html.escape(run_label(run))} on {html.escape(run['dataset_name'])}</h1>",
             f"<p class='sub'>{html.escape(run['detector'])} · trained {run['created'][:16].replace('T', ' ')} UTC · "
             f"report made {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
             _verdict(at, image_threshold, preset), _bands(results, decisions, review, rules),
             "<h2>Metrics</h2>", _metrics_table(run, at, image_threshold, pixel_threshold)]

    charts = []
    if image_dist.has_both_classes:
        charts += [figures.roc_figure(image_dist, image_threshold), figures.pr_figure(image_dist, image_threshold)]
    charts += [figures.histogram_figure(image_dist, image_threshold), figures.confusion_figure(at)]
    if pixel_dist is not None and pixel_dist.has_both_classes:
        charts += [figures.roc_figure(pixel_dist, pixel_threshold, "pixels"),
                   figures.histogram_figure(pixel_dist, pixel_threshold, "pixels")]
    parts += ["<h2>Curves at the chosen threshold</h2><div class='grid'>",
              *[f"<div>{fig.to_html(full_html=False, include_plotlyjs=False)}</div>" for fig in charts], "</div>"]

    parts += ["<h2>Heatmaps</h2>",
              "<p>Each row: the test image, its anomaly heatmap (ground truth outlined in green) and the region "
              "flagged at the pixel threshold (cyan). All heatmaps share one colour scale:</p>",
              figures.colourbar_figure(*scale, image_threshold, pixel_threshold).to_html(
                  full_html=False, include_plotlyjs=False)]
    for title, indices in _image_sections(results, image_threshold, worst):
        if len(indices):
            parts.append(f"<h3>{title}</h3>")
            parts += [_image_card(results, i, decisions[i], image_threshold, pixel_threshold, scale, rules)
                      for i in indices]

    parts.append("<h2>Model</h2><details><summary>Model card and parameters</summary><pre>"
                 f"{html.escape(json.dumps(run['model_card'], indent=2, default=json_default))}</pre></details>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>AnomalyScope report: {html.escape(run_label(run))}</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")


def report_file_name(run: dict) -> str:
    return f"anomalyscope-run{run['id']}-{run['detector']}.html"


def _verdict(at: dict, threshold: float, preset: str | None) -> str:
    chosen = PRESET_LABELS.get(preset or "", "set by hand" if preset == "manual" else preset or "default")
    defects, normals = at["tp"] + at["fn"], at["tn"] + at["fp"]
    caught = f"<b>{at['tp']} of {defects}</b> defective test images caught" if defects else "no defective test images"
    return (f"<p class='verdict'>At image threshold <b>{threshold:.4g}</b> ({html.escape(chosen)}): {caught}, "
            f"<b>{at['fp']} false alarm{'s' if at['fp'] != 1 else ''}</b> among {normals} good images.</p>")


def _bands(results: RunResults, decisions: list[Decision], review: float | None, rules: DefectRules | None) -> str:
    """How the test images fall in the OK / review / NG verdicts, good and defective apart ('' with neither a
    review band nor rules)."""
    with_rules = rules is not None and not rules.empty
    if review is None and not with_rules:
        return ""
    labels = np.array([d.label for d in decisions])
    cells = []
    for truth, name in ((0, "good"), (1, "defective")):
        mine = labels[np.asarray(results.labels) == truth]
        if len(mine):
            counts = ", ".join(f"{int((mine == band).sum())} {band}" for band in ("OK", "review", "NG"))
            cells.append(f"{len(mine)} {name} images: {counts}")
    said = [] if review is None else [f"Review band from <b>{review:.4g}</b> up to the threshold: scores in it go "
                                      "to a person."]
    if with_rules:
        said.append(f"Defect rules: {html.escape(rules.describe())}.")
    return f"<p>{' '.join(said)} " + "; ".join(cells) + ".</p>"


def _metrics_table(run: dict, at: dict, image_threshold: float, pixel_threshold: float) -> str:
    m, t = run["metrics"] or {}, run["timings"] or {}

    def fmt(value, pattern="{:.3f}"):
        return "—" if value is None else pattern.format(value)

    rows = [("Image AUROC", fmt(m.get("image_auroc"))), ("Pixel AUROC", fmt(m.get("pixel_auroc"))),
            ("AUPRO (FPR ≤ 0.3)", fmt(m.get("aupro"))), ("F1-max", fmt(m.get("f1_max"))),
            ("Image threshold", fmt(image_threshold, "{:.4g}")), ("Pixel threshold", fmt(pixel_threshold, "{:.4g}")),
            ("Precision at threshold", fmt(at["precision"])), ("Recall at threshold", fmt(at["recall"])),
            ("False-positive rate at threshold", fmt(at["fpr"])), ("Missed defects", str(at["fn"])),
            ("Training time", fmt(t.get("fit_seconds"), "{:.1f} s")),
            ("Latency", fmt(t.get("score_ms_per_image"), "{:.0f} ms per image")),
            ("Inference memory", fmt(t.get("memory_mb"), "{:.0f} MB"))]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='metrics'>{body}</table>"


def borderline_images(scores, threshold: float, k: int = BORDERLINE_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """The images closest to the threshold on each side: the `k` highest scores under it (OK, nearest first) and
    the `k` lowest at or over it (NG, nearest first). Where a threshold is worth questioning, these are the parts
    to look at, not the obvious defects."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged = is_anomalous(scores, threshold)
    descending, ascending = np.argsort(-scores, kind="stable"), np.argsort(scores, kind="stable")
    return descending[~flagged[descending]][:k], ascending[flagged[ascending]][:k]


def _image_sections(results: RunResults, threshold: float, worst: int) -> list[tuple[str, np.ndarray]]:
    """Highest-scoring images first, the borderline ones on both sides of the threshold, then the mistakes a
    stakeholder will ask about."""
    order = np.argsort(-results.scores, kind="stable")
    flagged = is_anomalous(results.scores, threshold)
    normal = results.labels == 0
    missed = [i for i in order[::-1] if results.labels[i] == 1 and not flagged[i]]   # lowest scores first
    false_alarms = [i for i in order if normal[i] and flagged[i]]
    under, over = borderline_images(results.scores, threshold)
    return [(f"The {min(worst, len(order))} highest-scoring test images", order[:worst]),
            ("Borderline, just under the threshold (OK): the highest-scoring images that pass, the next false "
             "alarms if it is lowered", under),
            ("Borderline, at or just over the threshold (NG): the lowest-scoring images flagged, the next misses "
             "if it is raised", over),
            ("Missed defects (below the threshold)", np.array(missed[:worst], dtype=int)),
            ("False alarms (good images above the threshold)", np.array(false_alarms[:worst], dtype=int))]


def _image_card(results: RunResults, i: int, decision: Decision, image_threshold: float, pixel_threshold: float,
                scale, rules: DefectRules | None) -> str:
    frame, amap, mask = results.frame(i), results.map(i), results.mask(i)
    truth = "good" if results.labels[i] == 0 else f"defect: {results.defects[i]}"
    roi = None if rules is None else rules.roi_at(amap.shape, results.preprocess)
    images = [data_uri(frame), data_uri(heatmap_panel(frame, amap, scale, 0.5, mask)),
              data_uri(region_panel(frame, amap, pixel_threshold, mask, roi, flagged=decision.label == "NG"))]
    return (f"<div class='card'><p><b>{html.escape(results.name(i))}</b> · score {results.scores[i]:.4g} "
            f"vs threshold {image_threshold:.4g} · <span class='{decision.label.lower()}'>{decision.label}</span> "
            f"({html.escape(decision.rule)}) · {truth}</p>"
            + "".join(f"<img src='{src}' alt='{alt}'>" for src, alt in
                      zip(images, ("image", "heatmap", "predicted region"))) + "</div>")

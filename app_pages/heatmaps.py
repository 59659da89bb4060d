"""Heatmaps: the test images sorted by score, filtered by outcome and defect type, and one image in detail.

Every map of a run is drawn on the run's one colour scale (never rescaled per image, which would make good
parts look defective); the legend shows that scale with the thresholds on it.
"""
import numpy as np
import streamlit as st

from core.app.render import heatmap_panel, region_panel, thumbnail
from core.rules import DefectRules
from core.thresholds import is_anomalous
from ui import state, widgets

PAGE_SIZE = 24
OUTCOMES = {"caught defect": "TP", "false alarm": "FP", "missed defect": "FN", "correct OK": "TN"}


@st.cache_data(max_entries=16, show_spinner="Applying the defect rules…")
def verdicts(registry: str, run_id: int, threshold: float, pixel_threshold: float, roi_png: bytes | None,
             settings: dict) -> list[str]:
    """Every test image's verdict under the rules (two bands: the outcome filter is OK / NG)."""
    found, rules = state.results(run_id), DefectRules.from_saved(settings, roi_png)
    return [found.decide(i, threshold, None, pixel_threshold, rules).label for i in range(len(found))]


st.title("Heatmaps")
run = state.require_run()
results = state.require_results(run)
_, _, scale = state.distributions(run["id"])
image_threshold, pixel_threshold = state.threshold(run, "image"), state.threshold(run, "pixel")
unsaved = (image_threshold != run["thresholds"]["image"]) or (pixel_threshold != run["thresholds"]["pixel"])
st.caption(f"Run **{state.run_caption(run)}** · image threshold {image_threshold:.4g}, pixel threshold "
           f"{pixel_threshold:.4g}" + (" (moved on the Thresholds page, not saved yet)" if unsaved else ""))

rules = DefectRules.of_run(run)
review = state.review(run)
if rules.empty:
    flagged = is_anomalous(results.scores, image_threshold)
else:   # the rules may clear NG scores: the outcome follows the verdicts
    st.caption(f"Defect rules: {rules.describe()} (set on the Thresholds page).")
    flagged = np.array([label == "NG" for label in verdicts(str(state.store().path), run["id"], image_threshold,
                                                            pixel_threshold, rules.roi_png(), rules.settings())])
anomalous = results.labels == 1
outcome = np.where(anomalous, np.where(flagged, "TP", "FN"), np.where(flagged, "FP", "TN"))


@st.cache_data(max_entries=2048, show_spinner=False)
def gallery_tile(registry: str, run_id: int, i: int, scale: tuple[float, float]) -> np.ndarray:
    found = state.results(run_id)
    return thumbnail(heatmap_panel(found.frame(i), found.map(i), scale, 0.5, found.mask(i)), 200)


filters = st.columns([2, 2, 1])
chosen_outcomes = filters[0].multiselect("Outcome at the threshold", list(OUTCOMES), default=list(OUTCOMES))
defects = sorted(set(results.defects))
chosen_defects = filters[1].multiselect("Defect type", defects, default=defects)
order = filters[2].radio("Sort by score", ["highest first", "lowest first"])
wanted = {OUTCOMES[o] for o in chosen_outcomes}
shown = [i for i in np.argsort(-results.scores, kind="stable")
         if outcome[i] in wanted and results.defects[i] in chosen_defects]
if order == "lowest first":
    shown = shown[::-1]
counts = {name: int(np.sum(outcome == code)) for name, code in OUTCOMES.items()}
st.caption(" · ".join(f"{n} {name}{'s' if n != 1 and name != 'correct OK' else ''}" for name, n in counts.items())
           + f" · showing {len(shown)}")

if not shown:
    st.info("No test image matches these filters.")
    st.stop()
if st.session_state.get("heatmap_image") not in shown:
    st.session_state["heatmap_image"] = shown[0]

i = st.session_state["heatmap_image"]
frame, amap, mask = results.frame(i), results.map(i), results.mask(i)
score = float(results.scores[i])
decision = results.decide(i, image_threshold, review, pixel_threshold, rules)
head = st.columns([3, 1, 1, 1])
head[0].subheader(results.name(i))
head[1].metric("Score", f"{score:.4g}", delta=f"{score - image_threshold:+.3g} vs threshold",
               delta_color="inverse")
head[2].metric("Verdict", decision.label, help=decision.rule)
head[3].metric("Truth", "good" if results.labels[i] == 0 else results.defects[i])
controls = st.columns([2, 1])
alpha = controls[0].slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="heatmap_alpha")
show_truth = controls[1].toggle("Ground-truth contour", True, disabled=mask is None or not mask.any())
truth = mask if show_truth else None
panels = st.columns(3)
panels[0].image(frame, caption="Image", width="stretch")
panels[1].image(heatmap_panel(frame, amap, scale, alpha, truth), width="stretch",
                caption="Heatmap" + (" · ground truth in green" if truth is not None and truth.any() else ""))
roi = rules.roi_at(amap.shape, results.preprocess)
panels[2].image(region_panel(frame, amap, pixel_threshold, truth, roi), width="stretch",
                caption=f"Predicted region at pixel threshold {pixel_threshold:.4g} (cyan)"
                        + ("" if roi is None else ", inside the region of interest (yellow)"))
st.caption(f"Verdict **{decision.label}**: {decision.rule}.")
widgets.colour_legend(scale, image_threshold, pixel_threshold)
st.divider()
st.subheader("All test images, by score")
pages = max(1, -(-len(shown) // PAGE_SIZE))
page = st.number_input("Page", 1, pages, 1, key="heatmap_page") if pages > 1 else 1
grid = st.columns(6)
for k, i in enumerate(shown[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]):
    with grid[k % 6]:
        st.image(gallery_tile(str(state.store().path), run["id"], int(i), scale))
        label = f"{results.scores[i]:.3g} · {outcome[i]}"
        if st.button(label, key=f"open_{i}", width="stretch",
                     type="primary" if i == st.session_state["heatmap_image"] else "secondary",
                     help=results.name(i)):
            st.session_state["heatmap_image"] = int(i)
            st.rerun()


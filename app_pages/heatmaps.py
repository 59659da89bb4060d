"""Heatmaps: the test images sorted by score, filtered by outcome and defect type; a tile's button opens the image
in detail over the page, where a false alarm can be marked good (trained on from the next fit of its dataset) and a
missed defect marked defective. For a PAD run the detail also shows the good training view the image was compared
with, turned into the image's pose (PAD's alignment made visible).

Every map of a run is drawn on the run's one colour scale (never rescaled per image, which would make good
parts look defective); the legend shows that scale with the thresholds on it. The filters keep their choice for the
session (``persist_state``), so leaving the page and coming back finds them as they were.
"""
import numpy as np
import streamlit as st

from core.app.render import heatmap_panel, region_panel, thumbnail, why_region
from core.rules import DefectRules
from core.thresholds import is_anomalous
from ui import state, widgets

PAGE_SIZE = 24
TILE = 150   # px: a tile's width, wide enough for its badges and button, narrow enough for 3 a row on a laptop
OUTCOMES = {"caught defect": "TP", "false alarm": "FP", "missed defect": "FN", "correct OK": "TN"}
NAMES = {code: name for name, code in OUTCOMES.items()}
# Colours say what happened: a missed defect is red, never a reassuring green.
COLOURS = {"TP": "blue", "FP": "orange", "FN": "red", "TN": "green"}
VERDICT_WORDS = {"NG": "judged NG", "review": "sent to review", "OK": "passed as OK", "": "not judged (no threshold)"}
DETAIL = "heatmap_detail"   # (run id, test image) open in the dialog; None when closed


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
feedback = {f["path"]: f for f in state.store().get_dataset(run["dataset_id"])["feedback"]}


@st.cache_data(max_entries=2048, show_spinner=False)
def gallery_tile(registry: str, run_id: int, i: int, scale: tuple[float, float]) -> np.ndarray:
    found = state.results(run_id)
    return thumbnail(heatmap_panel(found.frame(i), found.map(i), scale, 0.5, found.mask(i)), TILE)


def badges(i: int) -> str:
    """What happened to test image i, its defect type and what the user said of it, as coloured badges."""
    code, said = outcome[i], feedback.get(results.paths[i])
    return (f":{COLOURS[code]}-badge[{NAMES[code]}] :gray-badge[{widgets.plain(results.defects[i])}]"
            + (f" :violet-badge[marked {said['verdict']}]" if said else ""))


@st.cache_data(max_entries=64, show_spinner="Aligning the nearest good views…")
def aligned_reference(registry: str, run_id: int, i: int):
    """The training view a PAD run compares test image i with, turned into its pose (core's AlignedReference)."""
    return state.detector(state.store().get_run(run_id)).aligned_references(state.results(run_id).frame(i))[0]


def reference_panels(frame: np.ndarray, i: int) -> None:
    """PAD's alignment made visible: the test image, the good view it was matched with, and that view turned into
    the test image's pose (what the map compares it with; the area the view does not cover is darkened)."""
    ref = aligned_reference(str(state.store().path), run["id"], i)
    how = {"features": "matched local features (homography)", "rotation": "rotation search refined by ECC",
           "none": "no alignment"}[ref.method]
    panels = st.columns(3)
    panels[0].image(frame, caption="Test image", width="stretch")
    panels[1].image(ref.view, caption=f"Nearest good training view #{ref.index}", width="stretch")
    shown = np.where(ref.valid[..., None], ref.warped, ref.warped // 3)
    panels[2].image(shown, width="stretch", caption=f"That view aligned to the test image: {how}, correlation "
                                                    f"{ref.quality:.2f}")


def open_detail(i: int) -> None:
    st.session_state[DETAIL] = (run["id"], i)


def close_detail() -> None:
    st.session_state[DETAIL] = None


def say(i: int, verdict: str | None) -> None:
    """Record what the user says test image i is (None: undo it), then show the page with it."""
    if verdict is None:
        state.store().remove_feedback(run["dataset_id"], [results.paths[i]])
    else:
        state.store().set_feedback(run["dataset_id"], results.paths[i], verdict, run_id=run["id"])
    st.rerun()


@st.dialog("Test image", width="large", on_dismiss=close_detail)
def detail(i: int) -> None:
    frame, amap, mask = results.frame(i), results.map(i), results.mask(i)
    score, code = float(results.scores[i]), outcome[i]
    decision = results.decide(i, image_threshold, review, pixel_threshold, rules)
    truth = "good" if results.labels[i] == 0 else results.defects[i]
    st.subheader(results.name(i))
    st.markdown(f"{badges(i)} A {'good' if truth == 'good' else 'defective'} image "
                f"{VERDICT_WORDS[decision.label]}.")
    head = st.columns(3)
    head[0].metric("Score", f"{score:.4g}", delta=f"{score - image_threshold:+.3g} vs threshold",
                   delta_color=COLOURS[code])
    head[1].metric("Verdict", decision.label, help=decision.rule)
    head[2].metric("Truth", truth)
    controls = st.columns([2, 1])
    alpha = controls[0].slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="heatmap_alpha")
    show_truth = controls[1].toggle("Ground-truth contour", True, disabled=mask is None or not mask.any())
    truth_mask = mask if show_truth else None
    panels = st.columns(3)
    panels[0].image(frame, caption="Image", width="stretch")
    panels[1].image(heatmap_panel(frame, amap, scale, alpha, truth_mask), width="stretch",
                    caption="Heatmap" + (" · ground truth in green" if truth_mask is not None and truth_mask.any()
                                         else ""))
    roi = rules.roi_at(amap.shape, results.preprocess)
    ng = decision.label == "NG"
    hottest = why_region(amap, pixel_threshold, roi, ng)[1]
    panels[2].image(region_panel(frame, amap, pixel_threshold, truth_mask, roi, ng), width="stretch",
                    caption=(f"No pixel reaches the pixel threshold {pixel_threshold:.4g}: the hottest region "
                             "(magenta) is where the score came from" if hottest else
                             f"Predicted region at pixel threshold {pixel_threshold:.4g} (cyan)")
                            + ("" if roi is None else ", inside the region of interest (yellow)"))
    if run["detector"] == "pad":
        reference_panels(frame, i)
    st.caption(f"Verdict **{decision.label}**: {decision.rule}.")
    widgets.colour_legend(scale, image_threshold, pixel_threshold)
    said = feedback.get(results.paths[i])
    if said:
        effect = ("it is one of the normal training images from the next fit of this dataset, no longer a test image"
                  if said["verdict"] == "good" else "it is tested as a defect, never trained on")
        st.info(f"You marked it **{said['verdict']}** on {said['time'][:16].replace('T', ' ')} UTC, from run "
                f"#{said['run_id']}: {effect}.", icon=":material/rate_review:")
        if st.button("Undo", icon=":material/undo:", key="feedback_undo"):
            say(i, None)
        return
    actions = st.columns(2)
    if actions[0].button("Mark as good", icon=":material/thumb_up:", key="mark_good", width="stretch",
                         type="primary" if code == "FP" else "secondary",
                         help="It is good: the next fit of this dataset trains on it (it leaves the test set)"):
        say(i, "good")
    if actions[1].button("Mark as defective", icon=":material/report:", key="mark_defective", width="stretch",
                         type="primary" if code == "FN" else "secondary",
                         help="It is defective: it is tested as a defect and never trained on"):
        say(i, "defective")


opened = st.session_state.get(DETAIL)
if opened is not None and opened[0] == run["id"]:
    detail(opened[1])

# A wrapping row (not columns): on a narrow screen a filter moves to the next line instead of cutting its chips off.
with st.container(horizontal=True, gap="medium"):
    chosen_outcomes = st.pills("Outcome at the threshold", list(OUTCOMES), selection_mode="multi", wrap=True,
                               default=list(OUTCOMES), key="heatmap_outcomes", persist_state="session")
    defects = sorted(set(results.defects))
    chosen_defects = st.pills("Defect type", defects, selection_mode="multi", default=defects, wrap=True,
                              key=f"heatmap_defects_{run['id']}", persist_state="session")
    order = st.radio("Sort by score", ["highest first", "lowest first"], key="heatmap_order",
                     persist_state="session")
wanted = {OUTCOMES[o] for o in chosen_outcomes}
shown = [i for i in np.argsort(-results.scores, kind="stable")
         if outcome[i] in wanted and results.defects[i] in chosen_defects]
if order == "lowest first":
    shown = shown[::-1]
counts = {code: int(np.sum(outcome == code)) for code in NAMES}
st.caption(" · ".join(f":{COLOURS[code]}[{n} {NAMES[code]}{'s' if n != 1 and code != 'TN' else ''}]"
                      for code, n in counts.items()) + f" · showing {len(shown)}")

if not shown:
    st.info("No test image matches these filters.")
    st.stop()
pages = max(1, -(-len(shown) // PAGE_SIZE))
page = st.number_input("Page", 1, pages, 1, key="heatmap_page") if pages > 1 else 1
# Tiles of a fixed width in a wrapping row: as many per line as the screen holds, none squeezed to cut its words.
with st.container(horizontal=True):
    for i in shown[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]:
        with st.container(width=TILE):
            st.image(gallery_tile(str(state.store().path), run["id"], int(i), scale))
            st.markdown(badges(i))
            st.button(f"Score {results.scores[i]:.3g}", key=f"open_{i}", icon=":material/open_in_full:",
                      width="stretch", on_click=open_detail, args=(int(i),), help=f"{results.name(i)}: open in detail")

"""Thresholds: live ROC and precision-recall curves, score histograms and the confusion matrix at the
threshold, presets, and saving the choice with the run; image level and pixel level.

The panel is a fragment over distributions computed once per run (ui.state.distributions) and plots built
once per tab (core.app.figures.ThresholdFigures), so a slider move reruns only the panel and costs one binary
search plus moving the markers.
"""
import numpy as np
import pandas as pd
import streamlit as st

from core.data import IMAGE_SUFFIXES, ImageError, read_image, read_mask
from core.app.figures import ThresholdFigures, roi_figure, tradeoff_figure
from core.app.render import region_panel, thumbnail
from core.app.report import build_report, report_file_name
from core.rules import DefectRules, decide, roi_from_shapes
from core.thresholds import PRESET_LABELS, ScoreDistribution, normal_threshold, synthetic_miss_rate
from ui import state, widgets
from ui.threshold_slider import take_move, threshold_slider

LEVEL_WORDS = {"image": "images", "pixel": "pixels"}

st.title("Thresholds")
run = state.require_run()
calibration = state.calibration(run)
results = state.results(run["id"]) if calibration is not None else state.require_results(run)
image_dist, pixel_dist = state.distributions(run["id"])[:2] if results is not None else (None, None)
if image_dist is not None:
    st.caption(f"Run **{state.run_caption(run)}** · {image_dist.n_normal} normal and {image_dist.n_anomalous} "
               f"anomalous test images. A test image is NG when its score is at or above the threshold.")
else:
    st.caption(f"Run **{state.run_caption(run)}** · no test set: the threshold comes from good images alone. "
               "An image is NG when its score is at or above the threshold.")


def apply_preset(run: dict, level: str, dist: ScoreDistribution, name_key: str, value_key: str) -> None:
    """A preset picked (or its percentage changed) takes effect at once, so the label always names the
    threshold in use; "manual" and a preset these scores cannot compute keep the threshold and take the name."""
    name = st.session_state[name_key]
    if name not in dist.available_presets():
        state.set_threshold(run["id"], level, state.threshold(run, level), name)
        return
    value = st.session_state.get(value_key)
    if name in ("normal_quantile", "target_fpr") and value is not None:
        value = value / 100
    state.set_threshold(run["id"], level, dist.preset(name, value), name)


def save_threshold(run: dict, level: str, value: float, preset: str, note: str = "") -> None:
    """Save one level's threshold; the image level saves its review band with it (or its removal)."""
    extra = {}
    if level == "image":
        review = state.review(run)
        extra = {"review": review} if review is not None and review < value else {"remove_review": True}
    state.store().set_threshold(run["id"], **{level: value}, preset=preset, note=note, **extra)
    state.forget_thresholds(run["id"])
    st.toast(f"Saved the {level} threshold {value:.4g}.", icon=":material/check_circle:")


def moved_review(run_id: int, key: str) -> None:
    state.set_review(run_id, st.session_state[key])


def review_band(run: dict, dist: ScoreDistribution, t: float, low: float) -> float | None:
    """OK / review / NG: an optional lower threshold below the image threshold; scores between the two go to a
    person. Returns the band's lower end, or None."""
    run_id, current = run["id"], state.review(run)
    on = st.toggle("Review band below the threshold", value=current is not None and current < t,
                   key=f"review_on_{run_id}", help="Parts scoring just under the threshold go to a person "
                                                     "(review) instead of passing as OK")
    if not on:
        if current is not None:
            state.set_review(run_id, None)
        return None
    key = f"review_{run_id}"
    if current is None or current >= t:       # just switched on, or the threshold moved below the band
        current = t - (t - low) / 10
        state.set_review(run_id, current)
    st.session_state[key] = min(max(current, low), t)
    value = st.slider("Review from", low, t, format="%.4g", key=key, on_change=moved_review, args=(run_id, key),
                      help="Scores from here up to the threshold are 'review'; below it, OK")
    at_review, at_ng = dist.confusion(value), dist.confusion(t)
    st.caption(f"Test images: **{at_review['tn']} good and {at_review['fn']} defective OK** · "
               f"**{at_review['fp'] - at_ng['fp']} good and {at_review['tp'] - at_ng['tp']} defective to review** · "
               f"**{at_ng['fp']} good and {at_ng['tp']} defective NG**.")
    return value


@st.fragment
def good_images_panel(run: dict, calibration, test_dist: ScoreDistribution | None) -> None:
    """A threshold from the held-out good images alone, what it promises, and what synthetic defects say it
    would miss; beside the test set's real trade-off when there is one."""
    run_id, n = run["id"], len(calibration.scores)
    how = ("held out of training" if calibration.method == "held_out"
           else f"each scored by a model fitted without it ({calibration.summary().get('folds')}-fold cross-fit)")
    st.subheader("From good images only")
    st.caption(f"Rests on **{n} good training images** {how}, and one synthetic defect pasted into each. "
               "It needs no defect images: use it for a new line, and check it against real defects when "
               "they come.")
    left, middle = st.columns([1, 3], vertical_alignment="bottom")
    lowest = 100 / (n + 1)
    rate = left.number_input("Target false-reject rate, %", 0.01, 50.0, max(1.0, round(lowest + 0.005, 2)),
                             step=0.5, key=f"false_reject_{run_id}",
                             help="The share of good parts you accept to send to NG (or to review).")
    try:
        chosen = normal_threshold(calibration.scores, rate / 100)
    except ValueError as exc:
        st.warning(str(exc), icon=":material/warning:")
        return
    missed = synthetic_miss_rate(calibration.synthetic_scores, chosen.threshold)
    cols = st.columns(4)
    cols[0].metric("Threshold from good images", f"{chosen.threshold:.4g}")
    cols[1].metric("Good parts rejected", f"{chosen.expected_rate:.2%}",
                   help="Expected on new good parts like these" + (" (extrapolated by a tail fit)"
                                                                  if chosen.method == "tail fit" else ""))
    cols[2].metric(f"At most ({chosen.confidence:.0%} confidence)", f"{chosen.upper_rate:.2%}",
                   help="Exact for any score distribution, given how many good images it rests on; more good "
                        "images narrow it")
    cols[3].metric("Synthetic defects missed", f"{missed:.1%}",
                   help="An estimate from pasted-in defects: real ones may be subtler or plainer")
    st.caption(f"This threshold {chosen.describe()}.")
    synthetic = ScoreDistribution.from_scores(np.r_[np.zeros(n, int), np.ones(n, int)],
                                              np.r_[calibration.scores, calibration.synthetic_scores])
    st.plotly_chart(tradeoff_figure(synthetic, chosen.threshold, test_dist), key="tradeoff")
    if test_dist is not None:
        if middle.button("Use this threshold below", key=f"use_normal_{run_id}",
                         help="Moves the image threshold below to it; save it there"):
            state.set_threshold(run_id, "image", chosen.threshold, "false_reject_rate")
            st.rerun(scope="app")
    elif middle.button(f"Save threshold {chosen.threshold:.4g} with run #{run_id}", type="primary",
                       key=f"save_normal_{run_id}", icon=":material/save:"):
        save_threshold(run, "image", chosen.threshold, "false_reject_rate")
        st.rerun(scope="app")


def session_figures(run_id: int, level: str, dist: ScoreDistribution) -> ThresholdFigures:
    """This tab's own plots of the run (moving their marks mutates them, so they are never shared)."""
    built = st.session_state.setdefault("threshold_figures", {})
    if (run_id, level) not in built:
        built[(run_id, level)] = ThresholdFigures(dist, LEVEL_WORDS[level])
    return built[(run_id, level)]


def gap_caption(dist: ScoreDistribution, what: str) -> str:
    gap = dist.gap()
    if gap.separated:
        return (f"**Gap:** good {what} score up to {gap.highest_normal:.4g}, defective ones from "
                f"{gap.lowest_anomalous:.4g}: any threshold in between ({gap.width:.4g} wide, green on the slider) "
                f"separates them all; '{PRESET_LABELS['gap_middle']}' takes {gap.middle:.4g}.")
    return (f"**No gap:** good and defective {what} overlap from {gap.lowest_anomalous:.4g} to "
            f"{gap.highest_normal:.4g} (red on the slider): {gap.normal_above:,} good and {gap.anomalous_below:,} "
            f"defective {what} lie in it ({gap.normal_above + gap.anomalous_below:,} in all), so every threshold "
            "misses defects or raises false alarms.")


def saved_caption(run: dict, level: str) -> str:
    saved = run["thresholds"]["saved"][level]
    when = (saved["time"] or "")[:16].replace("T", " ")
    return f"Saved with the run ({saved['preset']}, {when} UTC)" + (f": {saved['note']}" if saved["note"] else ".")


def history_panel(run: dict, level: str) -> None:
    """The level's saved thresholds, newest first, and going back to one of them."""
    history = state.store().threshold_history(run["id"], level)
    with st.expander(f"Saved {level} thresholds of run #{run['id']} ({len(history)})", icon=":material/history:"):
        if not history:
            st.caption("None saved yet.")
            return
        table = pd.DataFrame([{"saved (UTC)": h["time"][:19].replace("T", " "), "threshold": h["value"],
                               **({"review from": h["review"]} if level == "image" else {}),
                               "preset": PRESET_LABELS.get(h["preset"], h["preset"]), "note": h["note"]}
                              for h in history])
        st.dataframe(table, hide_index=True, column_config={"threshold": st.column_config.NumberColumn(format="%.4g"),
                                                            "review from": st.column_config.NumberColumn(format="%.4g")})
        labels = {h["id"]: f"{h['value']:.4g} ({h['preset']}, saved {h['time'][:16].replace('T', ' ')})"
                  for h in history[1:]}     # the newest is the one in use
        if not labels:
            return
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        chosen = left.selectbox("Go back to", list(labels), format_func=labels.get, key=f"revert_{level}_{run['id']}")
        if right.button("Revert", key=f"revert_button_{level}_{run['id']}", icon=":material/undo:"):
            state.store().revert_threshold(run["id"], int(chosen))
            state.forget_thresholds(run["id"])
            st.toast(f"The {level} threshold is back to {labels[chosen]}.", icon=":material/undo:")
            st.rerun(scope="app")


@st.fragment
def threshold_panel(run: dict, level: str, dist: ScoreDistribution) -> None:
    what = LEVEL_WORDS[level]
    run_id = run["id"]
    slider_key = f"slider_{level}_{run_id}"
    moved_to = take_move(slider_key)
    if moved_to is not None:
        state.set_threshold(run_id, level, moved_to, "manual")
    t = state.threshold(run, level)
    # One step of room past both ends: the ends then flag every image, and none. A threshold beyond them (from
    # good images alone) widens the range rather than being moved.
    step = (dist.highest - dist.lowest) / 1000 or 1.0
    low, high = min(dist.lowest - step, t), max(dist.highest + step, t)

    preset_now = state.threshold_preset(run, level) or "manual"
    presets = dist.available_presets()
    options = presets + [p for p in (preset_now, "manual") if p not in presets]
    name_key, value_key = f"preset_{level}_{run_id}", f"preset_value_{level}_{run_id}"
    st.session_state[name_key] = preset_now if preset_now in options else "manual"
    left, middle = st.columns([2, 1], vertical_alignment="bottom")
    apply = dict(on_change=apply_preset, args=(run, level, dist, name_key, value_key))
    preset = left.selectbox("Preset", options, format_func=lambda p: PRESET_LABELS.get(p, p), key=name_key,
                            help="Takes effect when picked. F1-max balances misses and false alarms on the test set; "
                                 "a target false-positive rate caps false alarms; zero missed defects catches every "
                                 "defect in the test set; the middle of the gap leaves the most room on both sides "
                                 "when good and defective scores do not overlap; a quantile of normal scores works "
                                 "before any defect has been seen. Moving the slider makes it manual.", **apply)
    if preset == "target_fpr":
        middle.number_input("False-positive rate, %", 0.0, 100.0, 1.0, step=0.5, key=value_key, **apply)
    elif preset == "normal_quantile":
        middle.number_input("Quantile of normal scores, %", 50.0, 100.0, 99.0, step=0.1, key=value_key, **apply)

    threshold_slider(slider_key, f"{level.capitalize()} threshold", dist, t, low, high, step,
                     "Missed defects" if level == "image" else "Missed pixels")
    if dist.has_both_classes:
        st.caption(gap_caption(dist, what))
    review = review_band(run, dist, t, low) if level == "image" else None
    plots = session_figures(run_id, level, dist)
    at = plots.at(t)

    cols = st.columns(6)
    cols[0].metric("Threshold", f"{t:.4g}", help=f"preset: {PRESET_LABELS.get(preset_now, preset_now)}")
    cols[1].metric("Precision", f"{at['precision']:.3f}", help=f"Of the {what} flagged NG, the share truly anomalous")
    cols[2].metric("Recall", f"{at['recall']:.3f}", help=f"Of the anomalous {what}, the share flagged NG")
    cols[3].metric("False-positive rate", f"{at['fpr']:.3f}", help=f"Of the normal {what}, the share flagged NG")
    cols[4].metric("Missed defects" if level == "image" else "Missed pixels", f"{at['fn']:,}")
    cols[5].metric("False alarms", f"{at['fp']:,}")

    columns = st.columns(2)
    if plots.roc is not None:
        columns[0].plotly_chart(plots.roc, key=f"roc_{level}")
        columns[1].plotly_chart(plots.pr, key=f"pr_{level}")
    else:
        st.info(f"The test set has no anomalous {what}: ROC and precision-recall curves need both kinds. "
                "Use the quantile of normal scores until defects have been collected.")
    columns = st.columns(2)
    columns[0].plotly_chart(plots.histogram, key=f"hist_{level}")
    columns[1].plotly_chart(plots.confusion, key=f"confusion_{level}")

    saved = run["thresholds"][level]
    unsaved = saved is None or abs(saved - t) > 1e-12 or (level == "image" and review != run["thresholds"]["review"])
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    note_key = f"note_{level}_{run_id}"
    if st.session_state.pop(f"{note_key}_saved", False):    # a saved note is not the next one's
        st.session_state[note_key] = ""
    note = left.text_input("Note saved with it", key=note_key, max_chars=200,
                           placeholder="why this threshold (optional)")
    if right.button(f"Save {level} threshold {t:.4g} with run #{run_id}", type="primary" if unsaved else "secondary",
                    disabled=not unsaved, key=f"save_{level}", icon=":material/save:"):
        save_threshold(run, level, t, preset_now, note.strip())
        st.session_state[f"{note_key}_saved"] = True
        st.rerun(scope="app")
    if not unsaved:
        st.caption(saved_caption(run, level))
    history_panel(run, level)
    if level == "image":
        pixel = state.threshold(run, "pixel")
        st.download_button(
            "Download the report for stakeholders (HTML)", icon=":material/download:", mime="text/html",
            data=lambda: build_report(run, results, t, pixel, preset_now, review=review,
                                      rules=DefectRules.of_run(run)),
            file_name=report_file_name(run),
            help="One self-contained file: metrics, curves, this threshold, the worst images' heatmaps and the "
                 "borderline ones on both sides of the threshold. Opens offline in any browser.", key="report")


ROI_SOURCES = ["Whole image", "Draw on an image", "Upload a mask"]
DRAWN_PICTURE = 640     # the drawing shows the image at most this wide or high; the ROI keeps its full size


def reference_images(run: dict, results) -> list[str]:
    """Images to draw the ROI on and preview the rules with: the test images, highest score first, else the
    training images."""
    if results is not None:
        return [results.paths[i] for i in np.argsort(-results.scores, kind="stable")]
    dataset = state.dataset_images(state.store().get_dataset(run["dataset_id"]))
    return [str(p) for p in dataset.subset(split="train").paths]


@st.cache_data(max_entries=16, show_spinner="Scoring the image…")
def scored_image(registry: str, run_id: int, model_path: str, path: str) -> tuple[np.ndarray, np.ndarray, float]:
    image = read_image(path)
    prediction = state.detector(state.store().get_run(run_id)).predict([image])
    return image, prediction.maps[0], float(prediction.scores[0])


def drawn_roi(run_id: int, image: np.ndarray) -> np.ndarray | None:
    st.caption("Drag a box over the area where defects count, or pick the lasso in the chart's toolbar; hold "
               "Shift to add more shapes, double-click to start again.")
    event = st.plotly_chart(roi_figure(thumbnail(image, DRAWN_PICTURE), image.shape[:2]), on_select="rerun",
                            selection_mode=("box", "lasso"), key=f"roi_drawing_{run_id}",
                            config={"displayModeBar": True, "displaylogo": False})
    return roi_from_shapes(event.selection.get("box", []), event.selection.get("lasso", []), image.shape[:2])


def uploaded_roi(run_id: int) -> np.ndarray | None:
    file = st.file_uploader("Mask image: white (nonzero) where defects count", key=f"roi_mask_{run_id}",
                            type=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
    if file is None:
        return None
    try:
        mask = read_mask(file.getvalue())
    except ImageError as exc:
        st.error(f"That mask cannot be used: {widgets.plain(exc.reason)}")
        return None
    if not mask.any():
        st.error("That mask is black everywhere: it would ignore every defect. White marks where defects count.")
        return None
    return mask


def rules_panel(run: dict, results) -> None:
    """Where a defect counts and how big it must be, drawn or uploaded, previewed on an image and saved with
    the run; the Inspect and Heatmaps pages, the report and `predict` apply them."""
    run_id = run["id"]
    st.subheader("Defect rules")
    image_threshold = state.threshold(run, "image") if results is not None else run["thresholds"]["image"]
    if image_threshold is None:
        st.info("Save an image threshold first: the rules decide which NG verdicts stand.")
        return
    pixel_threshold = (state.threshold(run, "pixel") if results is not None
                       else run["thresholds"]["pixel"] or image_threshold)
    saved = DefectRules.of_run(run)
    st.caption(f"Saved: {saved.describe()}. Regions are the parts of the heatmap at or above the pixel threshold "
               f"{pixel_threshold:.4g}. Rules only clear verdicts: a review or NG part is OK when every region lies "
               "outside the region of interest or is smaller than the minimum area.")
    paths = reference_images(run, results)
    if not paths:
        st.info("This run's dataset has no images to draw on.")
        return
    left, right = st.columns([3, 2])
    with left:
        path = st.selectbox("Image", paths, format_func=lambda p: "/".join(p.split("/")[-2:]),
                            key=f"rules_image_{run_id}", help="Test images with the highest scores come first")
        image, amap, score = scored_image(str(state.store().path), run_id, run["model_path"], path)
        source = st.radio("Region of interest", ROI_SOURCES, horizontal=True, key=f"roi_source_{run_id}",
                          index=0 if saved.roi is None else 1)
        roi = None
        if source != ROI_SOURCES[0]:
            made = drawn_roi(run_id, image) if source == ROI_SOURCES[1] else uploaded_roi(run_id)
            roi = made if made is not None else saved.roi
            if made is None and saved.roi is not None:
                st.caption("Until you draw or upload a new one, the saved region of interest applies.")
    with right:
        min_area = st.number_input("Minimum defect area, image pixels", 0.0, float(image.shape[0] * image.shape[1]),
                                   float(saved.min_area), step=10.0, key=f"min_area_{run_id}",
                                   help="A region of the heatmap smaller than this does not count")
        scale = st.number_input("Scale, mm per pixel (0: unknown)", 0.0, 1000.0, float(saved.mm_per_px or 0.0),
                                step=0.01, format="%.4f", key=f"mm_per_px_{run_id}",
                                help="Only to show areas in mm²")
        rules = DefectRules(roi, min_area, scale or None)
        decision = decide(score, amap, image_threshold, state.review(run), pixel_threshold, rules)
        st.image(region_panel(image, amap, pixel_threshold, roi=rules.roi_at(image.shape[:2]),
                              flagged=decision.label == "NG"), width="stretch",
                 caption="Region of interest outlined in yellow, defect regions inside it in cyan")
        st.markdown(f"On this image: **{decision.label}**, {decision.rule}.")
        changed = rules.settings() != saved.settings() or not _same_roi(rules.roi, saved.roi)
        if st.button(f"Save rules with run #{run_id}", type="primary" if changed else "secondary",
                     disabled=not changed, icon=":material/save:", key=f"save_rules_{run_id}"):
            state.store().set_rules(run_id, rules)
            st.toast("Saved the defect rules.", icon=":material/check_circle:")
            st.rerun()


def _same_roi(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b))


if calibration is not None:
    good_images_panel(run, calibration, image_dist)
if results is not None:
    image_tab, pixel_tab = st.tabs(["Image threshold (OK / NG)", "Pixel threshold (defect region)"])
    with image_tab:
        threshold_panel(run, "image", image_dist)
    with pixel_tab:
        if pixel_dist is None or not pixel_dist.has_both_classes:
            st.info("Pixel thresholds need ground-truth masks of defective test images; this test set has none. "
                    "The heatmaps outline the region at or above the image threshold until then.")
        else:
            threshold_panel(run, "pixel", pixel_dist)
st.divider()
rules_panel(run, results)

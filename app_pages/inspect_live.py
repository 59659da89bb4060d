"""Inspect, the customer demo: an uploaded or camera image in, OK / NG with its heatmap and score out."""
import streamlit as st

from core.data import IMAGE_SUFFIXES, ImageError, read_image
from core.line.inspector import Inspector
from core.app.compare import run_label
from core.app.render import heatmap_panel, region_panel
from core.rules import DefectRules
from ui import state, widgets

VERDICT_COLOURS = {"OK": "green", "review": "orange", "NG": "red"}

st.title("Inspect")
record = state.current_dataset()
selected = state.current_run()
deployed = state.store().deployed_run(record["id"]) if record else None
# The run that scores is always named, and is another than the sidebar's only when the user picks the deployed one.
choices = {"selected": selected} if selected is not None else {}
if deployed is not None and (selected is None or deployed["id"] != selected["id"]):
    choices["deployed"] = deployed
if not choices:
    st.info("Train a run first (or run the demo on the Home page): inspection needs a model.")
    st.stop()
source = next(iter(choices))
if len(choices) > 1:
    source = st.radio("Score with", list(choices), horizontal=True, key="inspect_source",
                      format_func=lambda k: f"{'the run selected in the sidebar' if k == 'selected' else 'the deployed run'}"
                                            f" ({run_label(choices[k])})",
                      help="The deployed run is the one the line's service uses")
run = choices[source]
why = ("the run selected in the sidebar" + (", also the deployed run" if run["deployed"] else ", not the deployed one")
       if source == "selected" else f"the deployed run of {record['name']}"
       + ("" if selected is not None else " (no run is selected in the sidebar)"))
st.markdown(f"Scoring with **run #{run['id']} · {' · '.join(filter(None, (run['name'], run['detector'])))}**: {why}.")
image_threshold = run["thresholds"]["image"]
if image_threshold is None:
    st.warning(f"Run #{run['id']} has no saved threshold yet: set one on the Thresholds page first.")
    st.page_link("app_pages/thresholds.py", label="Set the threshold", icon=":material/tune:")
    st.stop()
pixel_threshold = run["thresholds"]["pixel"] or image_threshold
st.caption(f"With its saved threshold {image_threshold:.4g}"
           + ("" if run["deployed"] else " · deploy a run on the Compare page for the line to use it") + ".")

detector = state.detector(run)
found = state.results(run["id"])
scale = state.distributions(run["id"])[2] if found is not None else (0.0, 2 * image_threshold)

upload, camera = st.tabs(["Upload an image", "Take a photo"])
with upload:
    uploaded = st.file_uploader("Image of a part", type=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES),
                                key="inspect_upload")
with camera:
    photo = st.camera_input("Point the camera at the part", key="inspect_camera")
image_file = uploaded or photo
if image_file is None:
    st.info("Upload an image or take a photo to get a verdict.")
    st.stop()
try:
    image = read_image(image_file.getvalue())
except ImageError as exc:
    st.error(f"That file cannot be inspected: {widgets.plain(exc.reason)}")
    st.stop()

rules = DefectRules.of_run(run)
verdict = Inspector(detector, image_threshold, run["thresholds"]["review"], pixel_threshold, rules).inspect(image)
colour = VERDICT_COLOURS[verdict.label]
left, right = st.columns([1, 2], vertical_alignment="center")
with left:
    st.markdown(f"<div style='font-size:5rem;font-weight:800;color:{colour};line-height:1'>{verdict.label}</div>",
                unsafe_allow_html=True)
    st.markdown(f"Why: {verdict.reason}.")
    st.metric("Anomaly score", f"{verdict.score:.4g}", delta=f"{verdict.score - image_threshold:+.3g} vs threshold",
              delta_color="inverse")
    review = run["thresholds"]["review"]
    st.caption(f"Threshold {image_threshold:.4g}" + (f", review from {review:.4g}" if review is not None else "")
               + f" · answered in {1000 * verdict.seconds:.0f} ms"
               + ("" if rules.empty else f" · rules: {rules.describe()}"))
with right:
    panels = st.columns(2)
    panels[0].image(heatmap_panel(image, verdict.map, scale, 0.5), caption="Heatmap", width="stretch")
    roi = rules.roi_at(image.shape[:2])
    panels[1].image(region_panel(image, verdict.map, pixel_threshold, roi=roi, flagged=verdict.label == "NG"),
                    width="stretch",
                    caption=f"Region at or above the pixel threshold {pixel_threshold:.4g}"
                            + ("" if roi is None else ", inside the region of interest (yellow)"))
widgets.colour_legend(scale, image_threshold, pixel_threshold)

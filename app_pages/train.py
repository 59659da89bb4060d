"""Train: choose a detector and its parameters (or a saved model), watch each stage, cancel if need be."""
from pathlib import Path

import pandas as pd
import streamlit as st

from core.backbones import OFFLINE_WEIGHTS
from core.detectors import get_detector_class, list_detectors
from core.app.jobs import TrainingJob, chosen_settings
from core.params import param_specs, parse_value
from core.pipeline import corrections
from core.workspace import registrations_dir
from ui import state, widgets

# Parameters with widgets of their own (the backbone is chosen above the others).
DEVICE_CHOICES = ["auto", "cpu", "cuda"]
AUDIT_CHOICES = {"Use them all": "off", "Check and list them": "flag", "Leave them out": "drop"}
OTHER_BACKBONE = "another timm model…"



def registration_choice() -> str | None:
    """RegAD's registration: a file trained on other categories (found in the workspace), or none."""
    files = sorted(registrations_dir().glob("*.safetensors"))
    names = ["None (no registration)"] + [f.name for f in files]
    picked = st.selectbox("Registration", names, index=len(names) - 1, key="regad_registration",
                          help="Few-shot: RegAD needs only 2 to 8 good images. Its registration is learnt once on "
                               "other products; train one with `python -m core regad-train --data <categories>`.")
    if not files:
        st.caption("No registration trained yet: `python -m core regad-train --data <other categories>` makes one "
                   f"in {registrations_dir()}.")
    return None if picked == names[0] else str(registrations_dir() / picked)


st.title("Train")

entry = widgets.running_job()
if entry is not None:
    snapshot = entry["job"].snapshot()
    if snapshot.status == "running":
        st.caption(f"Dataset: {entry['job'].dataset.name} · "
                   f"{entry['job'].detector or 'saved model'}")
        widgets.job_progress()
        st.stop()
    widgets.finish_job()
    if snapshot.status == "done":
        state.select(entry["job"].dataset_id, snapshot.run_id)
        st.session_state["trained_run"] = (snapshot.run_id, snapshot.seconds)
        st.rerun()
    elif snapshot.status == "cancelled":
        st.warning("Training cancelled: nothing was registered.", icon=":material/cancel:")
    else:
        st.error(f"Training failed, nothing was registered: {widgets.plain(snapshot.error)}")

trained = st.session_state.pop("trained_run", None)
if trained:
    run = state.store().get_run(trained[0])
    metrics = run["metrics"] or {}
    st.success(f"Run #{run['id']} is ready ({trained[1]:.0f} s)"
               + (f": image AUROC {metrics['image_auroc']:.3f}" if "image_auroc" in metrics else "") + ".",
               icon=":material/check_circle:")
    for line in chosen_settings(run["model_card"] or {}):
        st.caption(line)
    marked_good = (run["model_card"] or {}).get("marked_good_by_user")
    if marked_good:
        st.caption(f"Trained on {run['model_card']['n_images']} images, {marked_good} of them marked good on the "
                   "Heatmaps page.")
    audited = (run["model_card"] or {}).get("audit")
    if audited:
        dropped = audited.get("dropped_files", [])
        if dropped:
            st.caption(f"Audit of the {audited['n_images']} training images: {len(dropped)} left out as suspicious "
                       f"({', '.join(dropped)}).")
            rows = state.store().run_scores(run["id"]).query("split == 'audit' and defect == 'dropped'")
            rows = rows.sort_values("score", ascending=False).head(12)
            st.image([str(p) for p in rows["path"]], width=120,
                     caption=[f"{Path(p).name} · {v:.3g}" for p, v in zip(rows["path"], rows["score"])])
        else:
            flagged = len(audited.get("suspicious", []))
            st.caption(f"Audit of the {audited['n_images']} training images: "
                       + (f"{flagged} look suspicious." if flagged else "none looked defective."))
            st.page_link("app_pages/datasets.py", label="Review the suspicious training images",
                         icon=":material/search:")
    candidates = (run["model_card"] or {}).get("auto_settings", {}).get("candidates")
    if candidates:
        with st.expander("Settings compared on held-out images with synthetic defects"):
            st.dataframe(pd.DataFrame(candidates), hide_index=True)
    st.markdown("**Next:**")
    cols = st.columns(4)
    cols[0].page_link("app_pages/thresholds.py", label="Set the threshold", icon=":material/tune:")
    cols[1].page_link("app_pages/heatmaps.py", label="Browse heatmaps", icon=":material/local_fire_department:")
    cols[2].page_link("app_pages/compare.py", label="Compare runs", icon=":material/leaderboard:")
    cols[3].page_link("app_pages/inspect_live.py", label="Try it live", icon=":material/verified:")

record = state.current_dataset()
if record is None:
    st.info("Create a dataset first (Datasets page), or run the demo on the Home page.")
    st.stop()
dataset = state.dataset_images(record)
n_train = len(dataset.subset(split="train", label=0))
left_out = len(record["excluded"])
marked = list(corrections(record).values())
added, tested = marked.count("good"), marked.count("defective")
notes = [note for n, note in ((added, f"{added} added as good from the Heatmaps page"),
                              (left_out, f"{left_out} left out on the Datasets page")) if n]
st.caption(f"Dataset **{record['name']}**: {n_train} normal training images"
           + (f" ({'; '.join(notes)})" if notes else "") + ", "
           f"{len(dataset.subset(split='test'))} test images"
           + (f" ({tested} marked defective on the Heatmaps page)" if tested else "") + ". Change it in the sidebar.")
if n_train < 2:
    st.warning("One training image is enough to fit a model but not to set its threshold: a threshold needs "
               "scores of good images the model was not fitted on. Add a few more good images (3 or more).",
               icon=":material/warning:")

new_model, saved_model = st.tabs(["Train a new model", "Load a saved model"])
with new_model:
    detectors = list_detectors()
    detector = st.selectbox("Detector", detectors, index=detectors.index("patchcore") if "patchcore" in detectors else 0,
                            help="PatchCore is the strongest here and trains in seconds; RegAD starts a new variant from 2 to 8 "
                                 "good images; the others are for comparison.")
    specs = param_specs(detector)
    params = {}
    by_name = {s.name: s for s in specs}
    if "backbone" in by_name:
        choices = list(OFFLINE_WEIGHTS) + [OTHER_BACKBONE]
        default = by_name["backbone"].default
        backbone = st.selectbox("Backbone", choices, index=choices.index(default) if default in choices else 0,
                                help="Pretrained feature extractor. EfficientNet-Lite weights ship with "
                                     "AnomalyScope and work offline; other timm models need their weights file.")
        if backbone == OTHER_BACKBONE:
            backbone = st.text_input("timm model name", placeholder="wide_resnet50_2")
            params["weights"] = st.text_input("Weights file on the server", placeholder="/models/wrn50.pth") or None
        params["backbone"] = backbone
    if detector == "regad":
        params["registration"] = registration_choice()
    with st.expander("Parameters", expanded=False):
        cols = st.columns(3)
        for k, spec in enumerate(s for s in specs if s.name not in params and s.name != "backbone"):
            key = f"param_{detector}_{spec.name}"
            with cols[k % 3]:
                if spec.kind == "bool":
                    params[spec.name] = st.checkbox(spec.name, spec.default, help=spec.help, key=key)
                elif spec.name == "device":
                    params[spec.name] = st.selectbox(spec.name, DEVICE_CHOICES, help=spec.help, key=key)
                elif spec.kind == "int":
                    params[spec.name] = int(st.number_input(spec.name, value=spec.default, step=1, help=spec.help,
                                                            key=key))
                elif spec.kind == "float":
                    params[spec.name] = st.number_input(spec.name, value=spec.default, format="%g", help=spec.help,
                                                        key=key)
                elif spec.kind == "str":
                    params[spec.name] = st.text_input(spec.name, spec.default, help=spec.help, key=key)
                else:
                    shown = spec.default if isinstance(spec.default, str) else repr(spec.default)
                    params[spec.name] = parse_value(spec, st.text_input(spec.name, shown, help=spec.help, key=key))
    run_name = st.text_input("Run name (optional)", placeholder=f"{detector} baseline")
    auditable = get_detector_class(detector).cross_fit
    audit = st.radio("Suspicious training images", list(AUDIT_CHOICES), key="audit_mode", horizontal=True,
                     disabled=not auditable,
                     help="A defect filed as good teaches the model that it is normal. Checking scores every good "
                          "training image with models fitted without it (five more fits) and lists those far above "
                          "the rest on the Datasets page; or leaves them out at once."
                          + ("" if auditable else f" Not for {detector}, which trains a network."))
    if st.button("Train", type="primary", icon=":material/play_arrow:", disabled=n_train == 0):
        widgets.start_job(TrainingJob(state.store(), record["id"], dataset, detector, params, name=run_name or None,
                                      audit=AUDIT_CHOICES[audit] if auditable else "off"))
        st.rerun()

with saved_model:
    st.markdown("Register a model saved earlier (a folder with `config.json` and `fitted.safetensors`, e.g. "
                "from `python -m core train`). It is scored on this dataset's test set and added as a new run.")
    folder = st.text_input("Model folder on the server", placeholder="/models/patchcore-3f2a9c")
    loaded_name = st.text_input("Run name (optional)", key="loaded_name")
    if st.button("Evaluate and register", icon=":material/upload_file:"):
        if not (Path(folder.strip()) / "config.json").is_file():
            st.error(f"No saved model at {folder!r}: the folder needs config.json and fitted.safetensors.")
        else:
            widgets.start_job(TrainingJob(state.store(), record["id"], dataset, model_folder=folder.strip(),
                                          name=loaded_name or None))
            st.rerun()

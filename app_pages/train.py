"""Train: choose a detector and its parameters (or a saved model), watch each stage, cancel if need be."""
from pathlib import Path

import pandas as pd
import streamlit as st

from core.backbones import OFFLINE_WEIGHTS
from core.detectors import create_detector, get_detector_class, list_detectors
from core.app.jobs import TrainingJob, chosen_settings, estimate_training_seconds
from core.params import ParamSpec, param_specs, parse_value
from core.pipeline import corrections
from core.workspace import registrations_dir
from ui import jobs, state, widgets

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


def param_widget(detector: str, spec: ParamSpec):
    """The field for one parameter, typed by its default; its help (the ? icon) is the detector's own doc."""
    key = f"param_{detector}_{spec.name}"
    if spec.kind == "bool":
        return st.checkbox(spec.name, spec.default, help=spec.help, key=key)
    if spec.name == "device":
        return st.selectbox(spec.name, DEVICE_CHOICES, help=spec.help, key=key)
    if spec.kind == "int":
        return int(st.number_input(spec.name, value=spec.default, step=1, help=spec.help, key=key))
    if spec.kind == "float":
        return st.number_input(spec.name, value=spec.default, format="%g", help=spec.help, key=key)
    if spec.kind == "str":
        return st.text_input(spec.name, spec.default, help=spec.help, key=key)
    shown = spec.default if isinstance(spec.default, str) else repr(spec.default)
    return parse_value(spec, st.text_input(spec.name, shown, help=spec.help, key=key))


def params_problem(detector: str, params: dict) -> str | None:
    """What is wrong with the parameters as typed (the detector's own check, run before any work), or None."""
    try:
        create_detector(detector, **params).check_params()
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def duration(seconds: float) -> str:
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


st.title("Train")

# The newest training on the server, whichever tab or page started it: its progress, or its outcome once.
job = jobs.board().latest("training")
if job is not None:
    snapshot = job.snapshot()
    if snapshot.running:
        jobs.progress_panel(job)
        st.stop()
    if not job.seen:
        job.seen = True
        if snapshot.status == "done":
            state.select(job.dataset_id, snapshot.run_id)
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
n_test = len(dataset.subset(split="test"))
left_out = len(record["excluded"])
marked = list(corrections(record).values())
added, tested = marked.count("good"), marked.count("defective")
notes = [note for n, note in ((added, f"{added} added as good from the Heatmaps page"),
                              (left_out, f"{left_out} left out on the Datasets page")) if n]
st.caption(f"Dataset **{record['name']}**: {n_train} normal training images"
           + (f" ({'; '.join(notes)})" if notes else "") + ", "
           f"{n_test} test images"
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
    st.caption(get_detector_class(detector).summary)
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
    with st.expander("Parameters (the defaults choose from your images)", key=f"parameters_{detector}"):
        st.caption("Hover the ? of a parameter for its meaning, unit and range. A parameter left at \"auto\" is "
                   "chosen from the training images; type a number to set it yourself.")
        cols = st.columns(3)
        for k, spec in enumerate(s for s in specs if s.name not in params and s.name != "backbone"):
            with cols[k % 3]:
                params[spec.name] = param_widget(detector, spec)
    problem = params_problem(detector, params)
    if problem:
        st.error(f"{widgets.plain(problem)}. Change it under Parameters before training.", icon=":material/edit:")
    run_name = st.text_input("Run name (optional)", placeholder=f"{detector} baseline")
    auditable = get_detector_class(detector).cross_fit
    audit = st.radio("Suspicious training images", list(AUDIT_CHOICES), key="audit_mode", horizontal=True,
                     disabled=not auditable,
                     help="A defect filed as good teaches the model that it is normal. Checking scores every good "
                          "training image with models fitted without it (five more fits) and lists those far above "
                          "the rest on the Datasets page; or leaves them out at once."
                          + ("" if auditable else f" Not for {detector}, which trains a network."))
    estimate = estimate_training_seconds(state.store(), detector, params, n_train, n_test)
    if estimate is not None:
        st.caption(f"Estimated time: {duration(estimate[0])} ({estimate[1]}).")
    else:
        st.caption(f"No earlier {detector} run here to estimate the time from; once it starts, the progress shows "
                   "the time left.")
    if st.button("Train", type="primary", icon=":material/play_arrow:", disabled=n_train == 0 or bool(problem)):
        jobs.start(TrainingJob(state.store(), record["id"], dataset, detector, params, name=run_name or None,
                               audit=AUDIT_CHOICES[audit] if auditable else "off",
                               estimate_s=estimate[0] if estimate else None))
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
            jobs.start(TrainingJob(state.store(), record["id"], dataset, model_folder=folder.strip(),
                                   name=loaded_name or None))
            st.rerun()

"""Home: what AnomalyScope does, what the registry holds, and a one-click demo."""
import pandas as pd
import streamlit as st

from core.app.demo import DEMO_DETECTOR, DEMO_PARAMS, demo_dataset, demo_run
from core.app.jobs import TrainingJob
from ui import jobs, state, widgets

st.title("AnomalyScope")
st.markdown("Find defects without ever labelling one: train on images of good parts, and AnomalyScope "
            "flags what looks different and shows where.  \nTune the OK / NG threshold with your "
            "stakeholders, browse the heatmaps, compare models and demo it live, all in the browser.")

demo = jobs.board().latest("training")
if demo is not None and demo.then == "demo":
    snapshot = demo.snapshot()
    if snapshot.running:
        jobs.progress_panel(demo)
        st.stop()
    if not demo.seen:
        demo.seen = True
        if snapshot.status == "done":
            state.select(demo.dataset_id, snapshot.run_id)
            st.switch_page("app_pages/heatmaps.py")
        elif snapshot.status == "failed":
            st.error(f"The demo training failed: {widgets.plain(snapshot.error)}")
        else:
            st.info("Demo training cancelled: nothing was registered.")

with st.container(border=True):
    left, right = st.columns([3, 1], vertical_alignment="center")
    left.markdown("**Try it in one click.** Trains PatchCore on the bundled hazelnut set (28 good images; "
                  "23 test images, 17 with colour defects) and opens its heatmaps. About half a minute.")
    if right.button("Run the demo", type="primary", icon=":material/play_arrow:", width="stretch",
                    disabled=jobs.training_busy()):
        dataset_id, dataset = demo_dataset(state.store())
        done = demo_run(state.store(), dataset_id)
        if done is not None:   # trained before: open its heatmaps instead of training a copy
            state.select(dataset_id, done["id"])
            st.switch_page("app_pages/heatmaps.py")
        jobs.start(TrainingJob(state.store(), dataset_id, dataset, DEMO_DETECTOR, DEMO_PARAMS, name="demo"),
                   then="demo")
        st.rerun()

all_datasets, all_runs = state.store().list_datasets(), state.store().list_runs()
datasets, runs = state.listed(all_datasets), state.listed(all_runs)
hidden = len(all_datasets) - len(datasets), len(all_runs) - len(runs)
st.subheader("Datasets")
if datasets:
    st.dataframe(pd.DataFrame([{
        "name": d["name"], "kind": d["kind"], "images": d["summary"].get("n_images"),
        "anomalous": d["summary"].get("n_anomalous"), "runs": sum(r["dataset_id"] == d["id"] for r in runs),
        "created": d["created"][:16].replace("T", " ")} for d in datasets]), hide_index=True)
    if hidden[0]:
        st.caption(f"{hidden[0]} archived not shown ('Show archived' in the sidebar).")
    st.page_link("app_pages/datasets.py", label="Datasets: images, load reports, rename, archive or delete",
                 icon=":material/photo_library:")
else:
    st.caption("None yet. Add one on the Datasets page, or run the demo above.")
st.subheader("Runs")
if runs:
    st.dataframe(pd.DataFrame([{
        "run": f"#{r['id']} {r['name'] or ''}".strip(), "dataset": r["dataset_name"], "detector": r["detector"],
        "image AUROC": (r["metrics"] or {}).get("image_auroc"), "pixel AUROC": (r["metrics"] or {}).get("pixel_auroc"),
        "image threshold": r["thresholds"]["image"], "deployed": r["deployed"],
        "created": r["created"][:16].replace("T", " ")} for r in runs]), hide_index=True,
        column_config={"image AUROC": st.column_config.NumberColumn(format="%.3f"),
                       "pixel AUROC": st.column_config.NumberColumn(format="%.3f"),
                       "image threshold": st.column_config.NumberColumn(format="%.4g")})
    if hidden[1]:
        st.caption(f"{hidden[1]} archived not shown ('Show archived' in the sidebar).")
    st.page_link("app_pages/compare.py", label="Compare: the runs side by side, deploy, rename, archive or delete",
                 icon=":material/leaderboard:")
else:
    st.caption("None yet. Train one on the Train page.")

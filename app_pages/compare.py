"""Compare: the runs of a dataset side by side (accuracy, mistakes at each one's threshold, latency, memory, size)
and the run to deploy, after a confirmation."""
import pandas as pd
import streamlit as st

from core.app import figures, manage
from core.app.compare import METRIC_COLUMNS, run_table
from ui import state

DEPLOY_PENDING = "deploy_pending"     # the run whose deployment waits for its confirmation

st.title("Compare")
record = state.current_dataset()
if record is None:
    st.info("Create a dataset and train a few runs first.")
    st.stop()
message = st.session_state.pop("run_message", None)   # what a rename or delete did, shown after its rerun
if message:
    st.success(message, icon=":material/check_circle:")
table = run_table(state.store(), record["id"])
if not state.show_archived():
    table = table[~table["archived"]] if len(table) else table
if table.empty:
    st.info(f"No runs on {record['name']} yet." if not len(run_table(state.store(), record["id"])) else
            f"Every run on {record['name']} is archived: turn on 'Show archived' in the sidebar to see them.")
    st.page_link("app_pages/train.py", label="Train a model", icon=":material/model_training:")
    st.stop()

st.caption(f"Dataset **{record['name']}** · {len(table)} run{'s' if len(table) != 1 else ''} · metrics on its test set, "
           "false alarms and missed defects at each run's own saved image threshold, latency per test image on this "
           "machine, memory = fitted model plus backbone weights.")
number = st.column_config.NumberColumn
hidden_columns = ["id", "created"] + ([] if state.show_archived() else ["archived"])
choosable = [c for c in table.columns if c not in hidden_columns and c != "run"]
shown = st.multiselect("Columns", choosable, default=choosable, key="compare_columns",
                       help="The run column always shows; scroll the table sideways when it is wider than the page")
st.dataframe(table[["run", *shown]], hide_index=True, width="stretch", column_config={
    "run": st.column_config.TextColumn(pinned=True),
    **{label: number(format="%.3f") for label in METRIC_COLUMNS.values()},
    "image threshold": number(format="%.4g"), "fit s": number(format="%.1f"),
    "false alarms": number(help="Good test images flagged NG at the run's saved image threshold"),
    "missed defects": number(help="Defective test images passed as OK at the run's saved image threshold"),
    "ms per image": number(format="%.0f"), "memory MB": number(format="%.0f"), "model MB": number(format="%.1f"),
    "deployed": st.column_config.CheckboxColumn(), "archived": st.column_config.CheckboxColumn()})

charts = st.columns(2)
charts[0].plotly_chart(figures.compare_figure(table, list(METRIC_COLUMNS.values())), key="compare_metrics")
if table["ms per image"].notna().any():
    charts[1].plotly_chart(figures.latency_figure(table), key="compare_latency")

st.subheader("Deploy")
deployed = table.loc[table["deployed"], "run"]
st.markdown(f"Deployed now: **{deployed.iloc[0]}**" if len(deployed) else "No run is deployed on this dataset yet.")
labels = dict(zip(table["id"], table["run"]))
choice = st.selectbox("Run to deploy", list(labels), format_func=labels.get,
                      index=list(labels).index(state.current_run()["id"]) if state.current_run() else 0)
if st.button("Deploy this run", type="primary", icon=":material/rocket_launch:"):
    st.session_state[DEPLOY_PENDING] = int(choice)
pending = st.session_state.get(DEPLOY_PENDING)
if pending in labels:
    row = table[table["id"] == pending].iloc[0]
    if row["deployed"]:
        st.info(f"{labels[pending]} is already the deployed run.")
        st.session_state.pop(DEPLOY_PENDING)
    else:
        with st.container(border=True):
            if row["image threshold"] is None or pd.isna(row["image threshold"]):
                consequence = "It has no saved image threshold: the Inspect page and the line cannot judge parts with it."
            else:
                consequence = (f"At its saved threshold {row['image threshold']:.4g} it made {row['false alarms']} false "
                               f"alarm(s) among {row['good tested']} good and missed {row['missed defects']} of "
                               f"{row['defective tested']} defective test images.")
            st.warning(f"Deploy **{labels[pending]}**" + (f" in place of **{deployed.iloc[0]}**" if len(deployed) else "")
                       + "? The Inspect page uses it at once; the line's service loads it at its next start. "
                       + consequence, icon=":material/rocket_launch:")
            yes, no = st.columns([1, 4])
            if yes.button(f"Yes, deploy {labels[pending]}", type="primary", key="confirm_deploy"):
                state.store().set_deployed(record["id"], pending)
                st.session_state.pop(DEPLOY_PENDING)
                st.toast(f"{labels[pending]} is deployed: the Inspect page uses it.", icon=":material/check_circle:")
                st.rerun()
            if no.button("Cancel", key="cancel_deploy"):
                st.session_state.pop(DEPLOY_PENDING)
                st.rerun()

st.subheader("Rename, archive or delete a run")
target = st.selectbox("Run", list(labels), format_func=labels.get, key="manage_run",
                      index=list(labels).index(state.current_run()["id"]) if state.current_run() else 0)
run = state.store().get_run(int(target))
new_name = st.text_input("New name", value=run["name"] or "", key=f"rename_run_{run['id']}",
                         placeholder=run["detector"])
if st.button("Rename", key="rename_run", disabled=new_name.strip() == (run["name"] or "")):
    manage.rename_run(state.store(), run["id"], new_name)
    st.session_state["run_message"] = f"Run #{run['id']} renamed."
    st.rerun()
archive = "Restore from the archive" if run["archived"] else "Archive"
if st.button(archive, icon=":material/archive:", key="archive_run",
             help="An archived run keeps its model and results; it is left out of the lists until 'Show archived'"):
    state.store().set_archived(run_id=run["id"], archived=not run["archived"])
    st.session_state["run_message"] = f"{labels[target]} {'restored' if run['archived'] else 'archived'}."
    st.rerun()
confirm = (f"Yes, delete {labels[target]} with its model files, although it is the deployed run: the line's service "
           "loses it at its next start" if run["deployed"] else f"Yes, delete {labels[target]} with its model files")
confirmed = st.checkbox(confirm, key=f"confirm_delete_run_{run['id']}")
if st.button("Delete run", icon=":material/delete:", key="delete_run", disabled=not confirmed):
    manage.delete_run(state.store(), run["id"])
    st.session_state["run_message"] = f"Deleted {labels[target]} and its model files."
    st.rerun()

"""Compare: the runs of a dataset side by side (accuracy, latency, memory, size) and the run to deploy."""
import streamlit as st

from core.app import figures, manage
from core.app.compare import METRIC_COLUMNS, run_table
from ui import state

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
           "latency per test image on this machine, memory = fitted model plus backbone weights.")
number = st.column_config.NumberColumn
hidden_columns = ["id", "created"] + ([] if state.show_archived() else ["archived"])
st.dataframe(table.drop(columns=hidden_columns), hide_index=True, column_config={
    **{label: number(format="%.3f") for label in METRIC_COLUMNS.values()},
    "image threshold": number(format="%.4g"), "fit s": number(format="%.1f"),
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
    state.store().set_deployed(record["id"], int(choice))
    st.toast(f"{labels[choice]} is deployed: the Inspect page uses it.", icon=":material/check_circle:")
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

"""Datasets: create one from uploads or a server folder; see its images, counts and load report; find the
training images that look defective and leave them out."""
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.audit import load_audit_maps
from core.data import IMAGE_SUFFIXES, EmptyDatasetError, read_image
from core.app.render import heatmap_panel, thumbnail
from core.results import colour_scale
from core.app.jobs import TrainingJob
from core.app import manage
from core.app.uploads import create_from_uploads, describe_normal_zip, register_folder
from ui import jobs, state, widgets

IMAGE_TYPES = sorted(s.lstrip(".") for s in IMAGE_SUFFIXES)
THUMBNAILS_PER_GROUP = 12

st.title("Datasets")


def uploads(files) -> list[tuple[str, bytes]]:
    return [(f.name, f.getvalue()) for f in files or []]


problems = []   # refused creations of this script run: the page then shows no other dataset's report below them


def show_problem(exc: Exception) -> None:
    """A bad upload: say what was wrong and that nothing was stored."""
    problems.append(exc)
    message = str(exc)
    if isinstance(exc, EmptyDatasetError):
        st.error(f"No usable normal images, so nothing was stored. {widgets.plain(message)}")
        if exc.report.skipped:
            st.dataframe(pd.DataFrame(exc.report.skipped, columns=["file", "why it was skipped"]), hide_index=True)
    else:
        st.error(f"Nothing was stored: {widgets.plain(message)}")


create_upload, create_folder = st.tabs(["Upload images", "Folder on the server"])
with create_upload:
    form = st.session_state.setdefault("upload_form", 0)   # a new number empties the uploaders after a success
    name = st.text_input("Dataset name", placeholder="e.g. bottle caps, line 3", key=f"name_{form}")
    normal = st.file_uploader("Normal images (good parts): many image files, or one zip",
                              type=IMAGE_TYPES + ["zip"], accept_multiple_files=True, key=f"normal_{form}",
                              help="A zip in MVTec layout (train/good/, test/<type>/, ground_truth/<type>/) "
                                   "brings its test set along.")
    test_kind = st.radio("Labelled test set (optional)", ["None", "A zip", "A folder"], horizontal=True,
                         key=f"test_kind_{form}",
                         help="MVTec layout: test/good/ and test/<defect type>/ folders; masks optional in "
                              "ground_truth/<defect type>/<image name>_mask.png. Without one, thresholds "
                              "are set from normal scores only.")
    test = []
    if test_kind == "A zip":
        test_zip = st.file_uploader("Test set zip", type=["zip"], key=f"test_zip_{form}")
        test = uploads([test_zip] if test_zip else [])
    elif test_kind == "A folder":
        test = uploads(st.file_uploader("Test set folder", accept_multiple_files="directory", key=f"test_dir_{form}"))
    for upload in uploads(normal):   # say what a zip holds and which of it will be used, before the click
        described = describe_normal_zip(upload, test_upload=test_kind != "None")
        if described:
            st.caption(widgets.plain(described))
    clicked = st.button("Create dataset", type="primary", icon=":material/add:", key="create_dataset")
    # A click while a file is still uploading reaches the server before the file does: the uploader is still
    # empty then. The click is kept, said so, and acted on in the rerun that the finished upload starts.
    missing = [] if normal else ["the normal images"]
    if test_kind != "None" and not test:
        missing.append(f"the test set {test_kind.removeprefix('A ')}")
    waiting = st.session_state.get("create_waiting") == form
    if (clicked or waiting) and missing:
        st.session_state["create_waiting"] = form
        st.info(f"Waiting for {' and '.join(missing)}: a file still uploading shows its progress above, and the "
                "dataset is created as soon as it has arrived. If you have not chosen it yet, choose it now.",
                icon=":material/hourglass_top:")
    elif clicked or waiting:
        st.session_state.pop("create_waiting", None)
        try:
            with st.spinner("Checking every image…"):
                dataset_id, _ = create_from_uploads(state.store(), name, uploads(normal), test)
        except (ValueError, OSError) as exc:   # EmptyDatasetError and ImageError are ValueErrors
            show_problem(exc)
        else:
            state.select(dataset_id)
            st.session_state["created_dataset"] = name
            st.session_state["upload_form"] = form + 1
            st.rerun()

with create_folder, st.form("folder_form"):
    path = st.text_input("Folder on the server", placeholder="/data/mvtec/bottle",
                         help="MVTec layout, or a plain folder of normal images. The images stay where they are.")
    folder_name = st.text_input("Dataset name (optional)", placeholder="the folder's name")
    if st.form_submit_button("Add folder", type="primary", icon=":material/create_new_folder:"):
        try:
            with st.spinner("Checking every image…"):
                dataset_id, _ = register_folder(state.store(), path.strip(), folder_name)
        except (ValueError, OSError) as exc:
            show_problem(exc)
        else:
            state.select(dataset_id)
            st.session_state["created_dataset"] = folder_name or path
            st.rerun()

if problems:
    st.caption("The datasets you already have are unchanged: pick one in the sidebar to see it.")
    st.stop()

message = st.session_state.pop("dataset_message", None)   # what a rename or delete did, shown after its rerun
if message:
    st.success(message, icon=":material/check_circle:")

created = st.session_state.pop("created_dataset", None)
if created:
    st.success(f"Dataset {created!r} is ready. Next: train a model on it.", icon=":material/check_circle:")
    st.page_link("app_pages/train.py", label="Train a model", icon=":material/model_training:")

record = state.current_dataset()
if record is None:
    st.info("No dataset yet: upload images above, or run the demo on the Home page.")
    st.stop()

st.header(record["name"])


def manage_dataset(record: dict) -> None:
    """Rename the dataset, or delete it with its runs and model files once the user has confirmed."""
    runs = state.store().list_runs(record["id"])
    deployed = [r for r in runs if r["deployed"]]
    with st.expander("Rename, archive or delete this dataset", icon=":material/edit:"):
        new_name = st.text_input("New name", value=record["name"], key=f"rename_dataset_{record['id']}")
        if st.button("Rename", key="rename_dataset", disabled=new_name.strip() in ("", record["name"])):
            try:
                manage.rename_dataset(state.store(), record["id"], new_name)
            except ValueError as exc:
                st.error(f"Not renamed: {widgets.plain(exc)}")
            else:
                st.session_state["dataset_message"] = f"Renamed to {new_name.strip()!r}."
                st.rerun()
        archive = "Restore from the archive" if record["archived"] else "Archive"
        if st.button(archive, icon=":material/archive:", key="archive_dataset",
                     help="An archived dataset keeps its images and runs; it is left out of the lists until "
                          "'Show archived' in the sidebar"):
            state.store().set_archived(dataset_id=record["id"], archived=not record["archived"])
            st.session_state["dataset_message"] = (f"{record['name']!r} restored." if record["archived"] else
                                                  f"{record['name']!r} archived: 'Show archived' in the sidebar "
                                                  "lists it again.")
            st.rerun()
        st.divider()
        files = ("its uploaded images" if record["kind"] == "upload"
                 else "nothing of the folder it was read from (those files are yours)")
        what = f"{len(runs)} run{'s' if len(runs) != 1 else ''} and their model files" if runs else "no runs"
        st.markdown(f"Deleting removes it from the registry with {what}, and {files}.")
        on_line = ", ".join(f"#{r['id']}" for r in deployed)
        confirmed = st.checkbox(f"Yes, delete {record['name']!r}" + (
            f", although run {on_line} is deployed on the line" if deployed else ""),
            key=f"confirm_delete_dataset_{record['id']}")
        if st.button("Delete dataset", type="primary", icon=":material/delete:", key="delete_dataset",
                     disabled=not confirmed or jobs.training_busy()):
            deleted = manage.delete_dataset(state.store(), record["id"])
            st.session_state["dataset_message"] = (f"Deleted {record['name']!r} and {len(deleted.runs)} "
                                                  f"run{'s' if len(deleted.runs) != 1 else ''}.")
            st.rerun()


manage_dataset(record)
dataset = state.dataset_images(record)
# What the import refused is gone from the folder: the registered report keeps it, today's load adds to it.
stored = record.get("report") or {}
skipped = list(dict.fromkeys(map(tuple, [*stored.get("skipped", []), *dataset.report.skipped])))
warnings = list(dict.fromkeys(map(tuple, [*stored.get("warnings", []), *dataset.report.warnings])))
# An upload's folder is the workspace's business; a server folder is where the user's images are.
origin = "uploaded" if record["kind"] == "upload" else f"{record['kind']} · {record['source']}"
st.caption(f"{origin} · images loaded: {len(dataset)} · skipped: {len(skipped)} · "
           f"warnings: {len(warnings)}")

counts = dataset.counts()
table = pd.DataFrame([{"split": split, "type": defect, "images": n,
                       "masks": sum(1 for s in dataset.samples if s.split == split and s.defect == defect
                                    and s.mask_path is not None)}
                      for split, per in counts.items() for defect, n in per.items()])
left, right = st.columns([1, 2])
with left:
    st.subheader("Counts")
    st.dataframe(table, hide_index=True)
    n_train = sum(counts.get("train", {}).values())
    n_test = sum(counts.get("test", {}).values())
    n_bad = sum(s.label for s in dataset.samples)
    st.metric("Training images (good)", n_train)
    st.metric("Test images", n_test, help="Good and defective images used to measure a model and set its threshold")
    if n_test and not n_bad:
        st.caption("The test set has no defective images: thresholds will come from normal scores.")
with right:
    st.subheader("Load report")
    if not skipped and not warnings:
        st.success(f"Every file of {record['name']!r} loaded cleanly.", icon=":material/check_circle:")
    if skipped:
        st.markdown(f"**{len(skipped)} skipped**")
        st.dataframe(pd.DataFrame(skipped, columns=["file", "why it was skipped"]), hide_index=True)
    if warnings:
        st.markdown(f"**{len(warnings)} warnings**")
        st.dataframe(pd.DataFrame(warnings, columns=["file", "warning"]), hide_index=True)


@st.cache_data(max_entries=64, show_spinner=False)
def thumbnails(paths: tuple[str, ...]) -> list:
    return [thumbnail(read_image(p), 160) for p in paths]


def audited_run(dataset_id: int) -> dict | None:
    """The newest run of the dataset that audited its training images."""
    return next((r for r in state.store().list_runs(dataset_id) if (r["model_card"] or {}).get("audit")), None)


@st.cache_data(max_entries=8, show_spinner="Drawing the audit's heatmaps…")
def audit_tiles(registry: str, run_id: int, paths: tuple[str, ...]) -> list[np.ndarray]:
    """Each image beside its heatmap from the models fitted without it, on one colour scale."""
    run = state.store().get_run(run_id)
    maps = load_audit_maps(run["model_path"])
    preprocess = state.detector(run).preprocess
    shown = [p for p in paths if p in maps]
    scale = colour_scale(np.stack([maps[p] for p in shown]), np.zeros(len(shown))) if shown else (0.0, 1.0)
    tiles = []
    for p in paths:
        frame = preprocess.image_to_frame(read_image(p))
        heat = heatmap_panel(frame, maps[p], scale, 0.5) if p in maps else np.zeros_like(frame)
        tiles.append(thumbnail(np.concatenate([frame, heat], axis=1), 320))
    return tiles


def leave_out_and_refit(record: dict, dataset, run: dict, chosen: list[str]) -> None:
    """Record the images as left out and train the audited run's detector again without them."""
    state.store().set_excluded(record["id"], [*record["excluded"], *chosen])
    name = f"{run['name'] or run['detector']} without {len(chosen)} suspicious"
    jobs.start(TrainingJob(state.store(), record["id"], dataset, run["detector"], run["params"], name=name))
    st.switch_page("app_pages/train.py")


def suspicious_panel(record: dict, dataset) -> None:
    """The audit's ranking of the training images with their heatmaps; leave out a choice of them and refit in
    one click, or restore images left out before."""
    st.subheader("Suspicious training images")
    st.caption("A defect filed among the good images teaches the model that it is normal. The audit scores each "
               "training image with models fitted without it (five folds) and ranks them; those far above the rest "
               "(beyond Tukey's outlier fence) are suspicious. Leaving an image out never deletes its file.")
    run = audited_run(record["id"])
    if run is None:
        st.info("No audit of this dataset yet. Checking trains PatchCore with the automatic settings, plus five "
                "more fits for the audit.")
        if st.button("Check the training images", icon=":material/search:", key="check_training_images",
                     disabled=jobs.training_busy()):
            jobs.start(TrainingJob(state.store(), record["id"], dataset, "patchcore", {}, audit="flag", name="audit"))
            st.switch_page("app_pages/train.py")
        return
    rows = state.store().run_scores(run["id"]).query("split == 'audit'").sort_values("score", ascending=False)
    excluded = set(record["excluded"])
    maps = load_audit_maps(run["model_path"])
    ranked = [p for p in rows["path"] if p in maps and p not in excluded]
    flagged = set(rows.query("defect in ('suspicious', 'dropped')")["path"])
    fence = run["model_card"]["audit"]["fence"]
    st.caption(f"From run #{run['id']} ({run['detector']}): {len(rows)} images audited, "
               f"**{len(flagged)} suspicious** (score above {fence:.4g}). The most suspicious, highest first:")
    chosen = []
    tiles = audit_tiles(str(state.store().path), run["id"], tuple(ranked))
    grid = st.columns(3)
    for k, (path, tile) in enumerate(zip(ranked, tiles)):
        score = float(rows.loc[rows["path"] == path, "score"].iloc[0])
        with grid[k % 3]:
            st.image(tile, width="stretch", caption=f"{Path(path).name} · audit score {score:.4g}"
                                                   + (" · suspicious" if path in flagged else ""))
            if st.checkbox("Leave out", value=path in flagged, key=f"leave_out_{run['id']}_{path}"):
                chosen.append(path)
    if st.button(f"Leave out {len(chosen)} image{'s' if len(chosen) != 1 else ''} and refit", type="primary",
                 icon=":material/cleaning_services:", disabled=not chosen or jobs.training_busy(),
                 key="leave_out_and_refit", help=f"Trains {run['detector']} again with the same parameters, "
                                                 "without them"):
        leave_out_and_refit(record, dataset, run, chosen)
    if excluded:
        st.markdown(f"**Left out of training: {len(excluded)}**")
        names = sorted(excluded)
        st.image(thumbnails(tuple(names[:THUMBNAILS_PER_GROUP])), width=110,
                 caption=[Path(p).name for p in names[:THUMBNAILS_PER_GROUP]])
        back = st.multiselect("Restore", names, format_func=lambda p: Path(p).name, key="restore_images")
        if st.button("Restore to training", disabled=not back, key="restore_button",
                     help="They are used again from the next training on"):
            state.store().set_excluded(record["id"], excluded - set(back))
            st.rerun()


suspicious_panel(record, dataset)


def feedback_panel(record: dict) -> None:
    """The test images the user marked good or defective on the Heatmaps page, and undoing a choice of them."""
    marked = record["feedback"]
    if not marked:
        return
    st.subheader(f"Marked on the Heatmaps page: {len(marked)}")
    st.caption("An image marked good is one of the normal training images from the next fit on (no longer a test "
               "image); one marked defective is tested as a defect and never trained on. Undoing a mark puts the "
               "image back where its folder says.")
    name = {f["path"]: f"{Path(f['path']).parent.name}/{Path(f['path']).name}" for f in marked}
    st.dataframe(pd.DataFrame([{"image": name[f["path"]], "marked": f["verdict"],
                                "from run": f"#{f['run_id']}" if f["run_id"] else "",
                                "when (UTC)": f["time"][:16].replace("T", " ")} for f in marked]), hide_index=True)
    shown = [f["path"] for f in marked[:THUMBNAILS_PER_GROUP]]
    st.image(thumbnails(tuple(shown)), width=110,
             caption=[f"{name[p]} · {f['verdict']}" for p, f in zip(shown, marked)])
    undo = st.multiselect("Undo the mark of", list(name), format_func=name.get, key="undo_feedback")
    if st.button("Undo", disabled=not undo, icon=":material/undo:", key="undo_feedback_button",
                 help="The next fit takes them as their folders say again"):
        state.store().remove_feedback(record["id"], undo)
        st.rerun()


feedback_panel(record)

st.subheader("Images")
for split, per in counts.items():
    for defect in per:
        group = dataset.subset(split=split, defect=defect)
        shown = [str(p) for p in group.paths[:THUMBNAILS_PER_GROUP]]
        st.markdown(f"**{split} / {defect}** · {len(group)} image{'s' if len(group) != 1 else ''}"
                    + (f" (first {len(shown)} shown)" if len(group) > len(shown) else ""))
        st.image(thumbnails(tuple(shown)), width=110, caption=[p.rsplit("/", 1)[-1] for p in shown])

"""What every page shares: the registry, the sidebar's dataset and run, per-run cached results, thresholds.

Caching follows Streamlit's rule: ``cache_resource`` for objects shared by every session, which are
never mutated (the registry handle, loaded detectors, :class:`~core.results.RunResults` with read-only
arrays), ``cache_data`` for data each caller gets its own copy of. Keys include the registry path, so two
workspaces (or test runs) never see each other's entries. Per-tab state (the selection, unsaved
thresholds, a running training job) lives in ``st.session_state``.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.detectors import Detector, ModelFolderError, load_detector
from core.detectors.calibration import Calibration, load_calibration
from core.app.embeddings import VIEWS_FILE, FeatureViews, load_views
from core.line.inspector import Inspector
from core.pipeline import corrections, open_dataset, run_results, sweep_unregistered_models
from core.results import RunResults
from core.runs import REGISTRY_FILENAME, RegistryError, RunStore
from core.thresholds import ScoreDistribution
from core.workspace import workspace_dir
from ui.widgets import plain

DATASET_KEY, RUN_KEY, SHOW_ARCHIVED_KEY = "dataset_id", "run_id", "show_archived"
_PENDING = "pending_selection"
_THRESHOLDS = "thresholds"
_REVIEWS = "review_thresholds"


# -- the registry and cached loads ----------------------------------------------------------------------
@st.cache_resource
def _store(path: str) -> RunStore:
    sweep_unregistered_models()   # once per server start: folders of trainings killed before registering
    return RunStore(path)


def store() -> RunStore:
    try:
        return _store(str(workspace_dir() / REGISTRY_FILENAME))
    except RegistryError as exc:   # a page cannot work without it: say why and how to fix it, on every page
        st.error(str(exc), icon=":material/database:")
        st.stop()


def _registry() -> str:
    return str(store().path)


@st.cache_data(max_entries=16, show_spinner="Loading the dataset…")
def _dataset(registry: str, dataset_id: int, source: str, marked: tuple[tuple[str, str], ...]):
    return open_dataset(store().get_dataset(dataset_id))


def dataset_images(record: dict):
    """The ImageSet of a registered dataset as the user corrected it from the heatmaps (a private copy: callers may
    filter it freely). A dataset whose files are gone or damaged stops the page with the reason, on whichever page
    asks."""
    try:
        return _dataset(_registry(), record["id"], record["source"], tuple(corrections(record).items()))
    except (OSError, ValueError) as exc:
        st.error(f"Dataset {record['name']!r} cannot be opened any more: {plain(exc)}. Put its files back, or create "
                 "the dataset again under another name.", icon=":material/folder_off:")
        st.stop()


@st.cache_resource(max_entries=16, show_spinner="Loading the run's test results…")
def _results(registry: str, run_id: int) -> RunResults | None:
    return run_results(store(), run_id)


def results(run_id: int) -> RunResults | None:
    return _results(_registry(), run_id)


@st.cache_resource(max_entries=16, show_spinner=False)
def _views(registry: str, run_id: int) -> tuple[ScoreDistribution, ScoreDistribution | None, tuple[float, float]]:
    found = _results(registry, run_id)
    return found.image_distribution(), found.pixel_distribution(), found.colour_scale()


def distributions(run_id: int) -> tuple[ScoreDistribution, ScoreDistribution | None, tuple[float, float]]:
    """Image and pixel score distributions and the colour scale of a run with results."""
    return _views(_registry(), run_id)


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _detector(registry: str, run_id: int, model_path: str) -> Detector:
    detector = load_detector(model_path)
    Inspector(detector).warm_up()
    return detector


def detector(run: dict) -> Detector:
    """The run's model, loaded once and shared by every session: only ever call its scoring methods. A model
    folder that is gone or damaged stops the page with the reason, never a traceback."""
    try:
        return _detector(_registry(), run["id"], run["model_path"])
    except ModelFolderError as exc:
        st.error(f"Run #{run['id']} cannot be used: {plain(exc)}", icon=":material/error:")
        st.stop()


@st.cache_resource(max_entries=16, show_spinner=False)
def _calibration(model_path: str, modified: float) -> Calibration | None:
    return load_calibration(model_path)


def calibration(run: dict) -> Calibration | None:
    """The run's held-out good images' scores (and their synthetic defects'); None for models saved before
    calibration existed, and for a model folder that is gone or damaged (the pages that need the model say
    so when they load it)."""
    try:
        config = Path(run["model_path"]) / "config.json"
        return _calibration(run["model_path"], config.stat().st_mtime)
    except Exception:  # noqa: BLE001 - a damaged folder is reported by the pages that load the model
        return None


# -- the selection in the sidebar ------------------------------------------------------------------------
def select(dataset_id: int | None = None, run_id: int | None = None) -> None:
    """Ask the sidebar to show this dataset and run from the next rerun on (call before rerun/switch_page)."""
    st.session_state[_PENDING] = (dataset_id, run_id)


def show_archived() -> bool:
    return bool(st.session_state.get(SHOW_ARCHIVED_KEY, False))


def listed(records: list[dict]) -> list[dict]:
    """The datasets or runs the lists show: archived ones only while the sidebar's toggle asks for them."""
    return records if show_archived() else [r for r in records if not r["archived"]]


def sidebar() -> None:
    """The dataset and run selectors, drawn by the frame on every page so their choice survives page switches."""
    pending = st.session_state.pop(_PENDING, None)
    with st.sidebar:
        _selectors(pending)
        if any(d["archived"] for d in store().list_datasets()) or any(r["archived"] for r in store().list_runs()):
            st.toggle("Show archived", key=SHOW_ARCHIVED_KEY, help="Archived datasets and runs are kept with their "
                      "files; they are only left out of the lists")


def _selectors(pending: tuple | None) -> None:
    datasets = listed(store().list_datasets())
    if not datasets:
        st.caption("Every dataset is archived: turn on 'Show archived' below." if store().list_datasets() else
                   "No datasets yet: create one on the Datasets page or try the demo on Home.")
        st.session_state.pop(DATASET_KEY, None)
        st.session_state.pop(RUN_KEY, None)
        return
    names = {d["id"]: d["name"] for d in datasets}
    if pending and pending[0] is not None:
        st.session_state[DATASET_KEY] = pending[0]
    if st.session_state.get(DATASET_KEY) not in names:
        st.session_state[DATASET_KEY] = datasets[0]["id"]
    dataset_id = st.selectbox("Dataset", list(names), format_func=names.get, key=DATASET_KEY)
    runs = listed(store().list_runs(dataset_id))
    if not runs:
        st.caption("No runs on this dataset yet: train one on the Train page.")
        st.session_state.pop(RUN_KEY, None)
        return
    labels = {r["id"]: run_caption(r) for r in runs}
    if pending and pending[1] is not None:
        st.session_state[RUN_KEY] = pending[1]
    if st.session_state.get(RUN_KEY) not in labels:
        deployed = next((r["id"] for r in runs if r["deployed"]), None)
        st.session_state[RUN_KEY] = deployed or runs[0]["id"]
    st.selectbox("Run", list(labels), format_func=labels.get, key=RUN_KEY)


def run_caption(run: dict) -> str:
    auroc = (run["metrics"] or {}).get("image_auroc")
    parts = [f"#{run['id']} {run['name'] or run['detector']}"]
    if auroc is not None:
        parts.append(f"AUROC {auroc:.3f}")
    if run["deployed"]:
        parts.append("deployed")
    if run["archived"]:
        parts.append("archived")
    return " · ".join(parts)


def current_dataset() -> dict | None:
    dataset_id = st.session_state.get(DATASET_KEY)
    try:
        return None if dataset_id is None else store().get_dataset(dataset_id)
    except KeyError:
        return None


def current_run() -> dict | None:
    run_id = st.session_state.get(RUN_KEY)
    if run_id is None:
        return None
    try:
        return store().get_run(run_id)
    except KeyError:
        return None


def require_run() -> dict:
    """The selected run, or a message that says what to do first (and the page stops)."""
    run = current_run()
    if run is None:
        st.info("Select a run in the sidebar, or train one first.")
        st.page_link("app_pages/train.py", label="Train a model", icon=":material/model_training:")
        st.stop()
    return run


def require_results(run: dict) -> RunResults:
    found = results(run["id"])
    if found is None:
        st.warning("This run's dataset has no test images, so there is nothing to score against. "
                   "Add a test set (good and defective images) on the Datasets page and train again.")
        st.stop()
    return found


# -- thresholds: saved with the run, or being tuned in this tab -------------------------------------------
def threshold(run: dict, level: str) -> float:
    """The threshold this tab is working with: moved but unsaved, else the run's saved one.

    A run without a saved threshold (its test set had no defects to choose by) starts at the 99th
    percentile of its normal image scores; the pixel level falls back to the image threshold.
    """
    moved = st.session_state.get(_THRESHOLDS, {}).get((run["id"], level))
    if moved is not None:
        return moved
    if run["thresholds"][level] is not None:
        return run["thresholds"][level]
    if level == "pixel":
        return threshold(run, "image")
    return distributions(run["id"])[0].normal_quantile(0.99)


def review(run: dict) -> float | None:
    """The lower end of the review band this tab is working with (moved but unsaved, else the run's); None
    for two bands only."""
    moved = st.session_state.get(_REVIEWS, {})
    return moved[run["id"]] if run["id"] in moved else run["thresholds"].get("review")


def set_review(run_id: int, value: float | None) -> None:
    st.session_state.setdefault(_REVIEWS, {})[run_id] = None if value is None else float(value)


def set_threshold(run_id: int, level: str, value: float, preset: str) -> None:
    st.session_state.setdefault(_THRESHOLDS, {})[(run_id, level)] = float(value)
    st.session_state.setdefault("threshold_presets", {})[(run_id, level)] = preset


def threshold_preset(run: dict, level: str) -> str | None:
    """How this tab's threshold of the level was chosen: moved but unsaved, else as the run saved it."""
    saved = run["thresholds"]["saved"][level]
    return st.session_state.get("threshold_presets", {}).get((run["id"], level), saved and saved["preset"])


def forget_thresholds(run_id: int) -> None:
    """After a save the run's stored values are the truth again."""
    for key in (_THRESHOLDS, "threshold_presets"):
        for level in ("image", "pixel"):
            st.session_state.get(key, {}).pop((run_id, level), None)
    st.session_state.get(_REVIEWS, {}).pop(run_id, None)


# -- feature views: computed on request, then read from the model folder -----------------------------------
@st.cache_resource(max_entries=8, show_spinner="Loading feature views…")
def _views_file(path: str, modified: float) -> FeatureViews:
    return load_views(Path(path).parent)


def feature_views(run: dict) -> FeatureViews | None:
    """The run's saved feature views (shared: read only), or None until they are computed."""
    path = Path(run["model_path"]) / VIEWS_FILE
    return _views_file(str(path), path.stat().st_mtime) if path.is_file() else None

"""Every page through streamlit.testing's AppTest: drive its main controls, assert on what it renders."""
import io
import json
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until
from PIL import Image
from streamlit.proto.Metric_pb2 import Metric as MetricProto
from streamlit.testing.v1 import AppTest

from core.app import embeddings
from core.app.jobs import job_board
from core.data import Preprocess, Sample
from core.params import param_specs
from core.pipeline import Evaluation, run_results
from core.results import save_results
from core.runs import RunStore
from core.workspace import DEMO_DIR, REPO_ROOT
from ui.widgets import plain

DEMO = DEMO_DIR / "hazelnut_toy"
APP = str(REPO_ROOT / "app.py")


def open_page(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    """Everything the page wrote, for substring checks."""
    parts = [e.value for kind in ("markdown", "caption", "title", "header", "subheader", "success", "info",
                                  "warning", "error") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def server_jobs():
    """The job board the app's pages use (this test's registry)."""
    return job_board(RunStore().path)


def slider(at: AppTest, key: str) -> dict:
    """What the threshold slider (ui.threshold_slider) was drawn with: label, value, min, max, counts."""
    element = next(e for e in at.get("bidi_component") if e.key == key)
    return json.loads(element.proto.mixed.json or element.proto.json)


def move_slider(at: AppTest, key: str, value: float) -> AppTest:
    """What the browser sends when the user lets go of the threshold slider at `value`."""
    at.session_state[key] = {"moved": {"threshold": float(value), "at": time.monotonic_ns()}}
    return at.run()


def wait_for_job(at: AppTest, seconds: float = 240) -> None:
    """Rerun the page as the browser's polling would, until the server's jobs have ended and the page has
    shown their outcome."""
    deadline = time.monotonic() + seconds
    while server_jobs().running() or any(not j.seen for j in server_jobs().jobs()):
        assert time.monotonic() < deadline, f"the training job did not end within {seconds:g} s"
        time.sleep(0.5)
        at.run()
    assert not at.exception, at.exception


def test_home_explains_and_lists_the_registry(workspace):
    at = open_page()
    assert at.title[0].value == "AnomalyScope"
    assert "without ever labelling" in texts(at)
    tables = [df.value for df in at.dataframe]
    assert tables[0]["name"].tolist() == ["hazelnut_toy"] and tables[1]["detector"].tolist() == ["patchcore"]
    assert at.sidebar.selectbox(key="run_id").value == workspace["run_id"]


def test_demo_in_one_click_trains_and_opens_the_heatmaps(monkeypatch):
    # The demo's own settings train the session's shared run (conftest.py); the click is checked at 128 px.
    monkeypatch.setattr("core.app.demo.DEMO_PARAMS", {"coreset_ratio": 0.05, "resize": 128})
    at = open_page()
    assert "None yet" in texts(at)
    next(b for b in at.button if b.label == "Run the demo").click().run()
    wait_for_job(at)
    at.run()
    assert at.title[0].value == "Heatmaps"
    assert len(at.image) >= 23                        # the gallery, then the chosen image's panels
    assert RunStore().list_runs()[0]["name"] == "demo"


def test_datasets_upload_shows_counts_report_and_thumbnails():
    at = open_page("datasets")
    assert "No dataset yet" in texts(at)
    good = sorted((DEMO / "train" / "good").iterdir())[:6]
    at.text_input(key="name_0").set_value("six nuts")
    at.file_uploader(key="normal_0").set_value([(p.name, p.read_bytes(), "image/jpeg") for p in good]
                                               + [("scratched.jpg", b"\xff\xd8 not really a jpeg", "image/jpeg")])
    at.radio(key="test_kind_0").set_value("A zip").run()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for p in sorted((DEMO / "test").rglob("*.jpg")) + sorted((DEMO / "ground_truth").rglob("*.png")):
            zf.write(p, p.relative_to(DEMO).as_posix())
    at.file_uploader(key="test_zip_0").set_value(("test.zip", buffer.getvalue(), "application/zip"))
    next(b for b in at.button if b.label == "Create dataset").click().run()
    assert not at.exception, at.exception
    assert "Dataset 'six nuts' is ready" in texts(at)
    counts = at.dataframe[0].value
    assert dict(zip(counts["type"] + "/" + counts["split"], counts["images"])) == {
        "good/train": 6, "good/test": 6, "colour/test": 17}
    skipped = at.dataframe[1].value
    assert skipped["file"].tolist() == ["scratched.jpg"]           # the name it was uploaded under
    assert len(at.image) >= 3                         # one thumbnail strip per split and type


def test_datasets_bad_upload_says_why_and_stores_nothing():
    at = open_page("datasets")
    at.text_input(key="name_0").set_value("junk")
    at.file_uploader(key="normal_0").set_value([("broken.png", b"\x89PNG broken", "image/png")])
    next(b for b in at.button if b.label == "Create dataset").click().run()
    assert "No usable normal images, so nothing was stored" in at.error[0].value
    assert RunStore().list_datasets() == []


def test_a_refused_upload_names_the_users_files_never_a_server_path_nor_another_datasets_report(workspace):
    at = open_page("datasets")
    at.text_input(key="name_0").set_value("wrongtype")
    at.file_uploader(key="normal_0").set_value([("part 7.png", b"\x89PNG broken", "image/png")])
    next(b for b in at.button if b.label == "Create dataset").click().run()
    shown = texts(at) + "".join(df.value.to_string() for df in at.dataframe)
    assert "wrongtype" in at.error[0].value and "part 7.png" in shown
    assert str(workspace["home"]) not in shown and "/datasets/" not in shown and "train/good" not in shown
    assert "loaded cleanly" not in shown and len(at.header) == 0     # the selected dataset is not shown under it


def test_an_mvtec_zip_among_the_normal_images_is_described_with_what_will_be_used():
    at = open_page("datasets")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for p in sorted(DEMO.rglob("*.*")):
            zf.write(p, "hazelnut_toy/" + p.relative_to(DEMO).as_posix())
    at.file_uploader(key="normal_0").set_value(("nuts.zip", buffer.getvalue(), "application/zip")).run()
    said = " ".join(c.value for c in at.caption)
    assert "nuts.zip is a set in MVTec layout: 28 training images" in said
    assert "labelled test set of 23 images" in said and "Both are used" in said     # while the radio says None
    at.radio(key="test_kind_0").set_value("A zip").run()
    assert "the test set you upload below is the test set" in " ".join(c.value for c in at.caption)


def test_create_clicked_before_the_upload_arrived_waits_and_then_creates():
    at = open_page("datasets")
    at.text_input(key="name_0").set_value("early click")
    next(b for b in at.button if b.label == "Create dataset").click().run()
    assert "Waiting for the normal images" in texts(at) and RunStore().list_datasets() == []
    good = sorted((DEMO / "train" / "good").iterdir())[:3]
    at.file_uploader(key="normal_0").set_value([(p.name, p.read_bytes(), "image/jpeg") for p in good]).run()
    assert not at.exception, at.exception                # the upload's own rerun acts on the earlier click
    assert "Dataset 'early click' is ready" in texts(at) and "Waiting" not in texts(at)
    assert [d["name"] for d in RunStore().list_datasets()] == ["early click"]


def test_train_page_builds_the_form_and_cancel_registers_nothing(workspace):
    at = open_page("train")
    assert next(s for s in at.selectbox if s.label == "Detector").value == "patchcore"
    assert "compact bank of good image patches" in texts(at)            # the detector in a sentence
    labels = {w.label for w in [*at.number_input, *at.checkbox, *at.text_input]}
    assert {"coreset_ratio", "reweight", "stages", "blur_sigma"} <= labels
    ratio = next(t for t in at.text_input if t.label == "coreset_ratio")   # "auto", or a number typed in
    assert ratio.value == "auto" and "held-out good images" in ratio.help
    params = {spec.name for spec in param_specs("patchcore")}
    assert all(w.help for w in [*at.number_input, *at.checkbox, *at.text_input] if w.label in params)
    # The workspace's demo run was trained with other settings: the estimate says so.
    assert "Estimated time: about" in texts(at) and "1 earlier patchcore run with other settings" in texts(at)
    before = len(workspace["store"].list_runs())
    next(t for t in at.text_input if t.label == "resize").set_value("128").run()   # a short fit, cancelled anyway
    next(b for b in at.button if b.label == "Train").click().run()
    job = server_jobs().latest("training")
    assert job is not None and job.detector == "patchcore"
    wait_until(lambda: job.snapshot().stages, 120, "the training job never started a stage")
    # A reload is a new session: on another page the sidebar lists the server's job, and cancels it.
    elsewhere = open_page("compare")
    assert any("Training patchcore on hazelnut_toy" in c.value for c in elsewhere.sidebar.caption)
    next(b for b in elsewhere.sidebar.button if b.label == "Cancel").click().run()
    assert job.snapshot().cancelling
    at.run()
    wait_for_job(at)
    assert "Training cancelled: nothing was registered." in texts(at)
    assert len(workspace["store"].list_runs()) == before


def test_train_form_checks_parameters_as_they_are_typed(workspace):
    at = open_page("train")
    next(t for t in at.text_input if t.label == "coreset_ratio").set_value("5").run()
    assert any("a fraction between 0 and 1 (e.g. 0.05 for 5%" in e.value for e in at.error)
    assert next(b for b in at.button if b.label == "Train").disabled
    next(t for t in at.text_input if t.label == "coreset_ratio").set_value("0.05").run()
    next(t for t in at.text_input if t.label == "resize").set_value("256").run()
    assert not at.error and not next(b for b in at.button if b.label == "Train").disabled
    # The same settings as the workspace's run: the estimate comes from it.
    assert "1 earlier patchcore run with the same settings" in texts(at)
    next(t for t in at.text_input if t.label == "resize").set_value("10").run()
    assert any("resize must be 'auto', a number of pixels from 32" in e.value for e in at.error)


def test_train_page_registers_a_saved_model(workspace):
    at = open_page("train")
    folder = workspace["store"].get_run(workspace["run_id"])["model_path"]
    next(t for t in at.text_input if t.label == "Model folder on the server").set_value(folder)
    next(b for b in at.button if b.label == "Evaluate and register").click().run()
    wait_for_job(at)
    assert any("is ready" in s.value and "image AUROC 1.000" in s.value for s in at.success)
    assert {link.label for link in at.get("page_link")} >= {"Set the threshold", "Browse heatmaps"}
    assert len(workspace["store"].list_runs()) == 2


def test_thresholds_move_presets_and_save(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    at = open_page("thresholds")
    saved = store.get_run(run_id)["thresholds"]["image"]
    assert float(metric(at, "Threshold")) == pytest.approx(saved, rel=1e-3)
    assert metric(at, "Recall") == "1.000" and metric(at, "False alarms") == "0"
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "ROC curve (images)" in specs and "Precision-recall (images)" in specs and "Confusion matrix" in specs

    assert at.selectbox(key=f"preset_image_{run_id}").value == "f1_max"   # as training saved it
    drawn = slider(at, f"slider_image_{run_id}")
    assert drawn["value"] == pytest.approx(saved) and drawn["label"] == "Image threshold"
    assert drawn["anomalous_at"][0] == 17 and drawn["normal_at"][0] == 6   # the counts the browser reads
    low = drawn["min"]
    move_slider(at, f"slider_image_{run_id}", low)
    assert float(metric(at, "Threshold")) == pytest.approx(low, rel=1e-3)
    assert metric(at, "False alarms") == "6" and metric(at, "Precision") == f"{17 / 23:.3f}"   # all flagged
    assert at.selectbox(key=f"preset_image_{run_id}").value == "manual"   # a hand move is manual
    assert slider(at, f"slider_image_{run_id}")["value"] == pytest.approx(low)

    at.selectbox(key=f"preset_image_{run_id}").set_value("zero_miss").run()     # takes effect when picked
    assert metric(at, "Missed defects") == "0" and metric(at, "False alarms") == "0"
    at.selectbox(key=f"preset_image_{run_id}").set_value("normal_quantile").run()
    assert metric(at, "False alarms") == "0"            # 99% of 6 good images: above them all
    at.number_input(key=f"preset_value_image_{run_id}").set_value(50.0).run()
    assert metric(at, "False alarms") == "3"            # half of the 6 good test images
    median = float(metric(at, "Threshold"))
    next(b for b in at.button if b.label.startswith("Save image threshold")).click().run()
    stored = store.get_run(run_id)["thresholds"]
    assert stored["image"] == pytest.approx(median, rel=1e-3) and stored["preset"] == "normal_quantile"
    assert "Saved with the run (normal_quantile" in texts(at)
    assert at.get("download_button")                   # the stakeholder report

    assert slider(at, f"slider_pixel_{run_id}")["label"] == "Pixel threshold"


def test_the_gap_preset_a_note_and_reverting_from_the_history(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    at = open_page("thresholds")
    gap = run_results(store, run_id).image_distribution().gap()
    assert gap.separated and f"takes {gap.middle:.4g}" in texts(at)
    at.selectbox(key=f"preset_image_{run_id}").set_value("gap_middle").run()
    assert float(metric(at, "Threshold")) == pytest.approx(gap.middle, rel=1e-3)
    assert metric(at, "False alarms") == "0" and metric(at, "Missed defects") == "0"
    at.text_input(key=f"note_image_{run_id}").input("most room on both sides").run()
    next(b for b in at.button if b.label.startswith("Save image threshold")).click().run()
    saved = store.get_run(run_id)["thresholds"]["saved"]
    assert saved["image"]["preset"] == "gap_middle" and saved["image"]["note"] == "most room on both sides"
    assert saved["pixel"]["preset"] == "f1_max"                                # the pixel level keeps its own
    assert "Saved with the run (gap_middle" in texts(at) and at.text_input(key=f"note_image_{run_id}").value == ""
    history = store.threshold_history(run_id, "image")
    assert [h["preset"] for h in history] == ["gap_middle", "f1_max"]
    assert at.selectbox(key=f"revert_image_{run_id}").options == [
        f"{history[1]['value']:.4g} (f1_max, saved {history[1]['time'][:16].replace('T', ' ')})"]
    button(at, f"revert_button_image_{run_id}").click().run()
    assert store.get_run(run_id)["thresholds"]["image"] == history[1]["value"]
    assert float(metric(at, "Threshold")) == pytest.approx(history[1]["value"], rel=1e-3)
    assert at.selectbox(key=f"preset_image_{run_id}").value == "f1_max" and "reverted to" in texts(at)


def synthetic_run(store: RunStore, tmp_path, n: int = 1000) -> int:
    """A run with n scored test images (small maps): what the slider timing is about."""
    rng = np.random.default_rng(0)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    scores = np.where(labels, rng.normal(2, 0.5, n), rng.normal(1, 0.3, n)).astype(np.float32)
    maps = (rng.random((n, 32, 32)) * scores[:, None, None]).astype(np.float16)
    masks = np.zeros((n, 32, 32), bool)
    masks[labels == 1, 8:16, 8:16] = True
    folder = tmp_path / "synthetic-model"
    folder.mkdir()
    image = next((DEMO / "test" / "good").iterdir())
    samples = [Sample(image, "test", int(y), "dent" if y else "good", None) for y in labels]
    save_results(folder, samples, Evaluation(scores, maps, list(masks), labels), Preprocess(resize=32, crop=None))
    dataset_id = store.add_dataset("synthetic", str(tmp_path), "folder", {}, {})
    return store.add_run(dataset_id=dataset_id, detector="patchcore", params={}, model_path=str(folder),
                         metrics={}, timings={}, model_card={}, scores=[], thresholds={"image": 1.5, "pixel": 1.5})


def test_review_band_is_set_saved_and_shown_on_the_heatmaps(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    at = open_page("thresholds")
    assert metric(at, "Recall") == "1.000" and metric(at, "False alarms") == "0"   # at the saved F1-max threshold
    at.toggle(key=f"review_on_{run_id}").set_value(True).run()
    low = at.slider(key=f"review_{run_id}").min
    at.slider(key=f"review_{run_id}").set_value(low).run()      # everything under the threshold goes to review
    assert "6 good and 0 defective to review" in texts(at) and "0 good and 17 defective NG" in texts(at)
    next(b for b in at.button if b.label.startswith("Save image threshold")).click().run()
    saved = store.get_run(run_id)["thresholds"]
    assert saved["review"] == pytest.approx(low, rel=1e-3) and saved["review"] < saved["image"]
    at.switch_page("app_pages/heatmaps.py").run()
    buttons = [b for b in at.button if b.key and b.key.startswith("open_")]
    buttons[-1].click().run()                                  # a good image: under the threshold, in the band
    assert metric(at, "Verdict") == "review"
    at.switch_page("app_pages/thresholds.py").run()
    at.toggle(key=f"review_on_{run_id}").set_value(False).run()
    next(b for b in at.button if b.label.startswith("Save image threshold")).click().run()
    assert store.get_run(run_id)["thresholds"]["review"] is None


def test_threshold_from_good_images_alone_beside_the_test_set(workspace):
    from core.detectors.calibration import load_calibration
    from core.thresholds import normal_threshold
    store, run_id = workspace["store"], workspace["run_id"]
    cal = load_calibration(store.get_run(run_id)["model_path"])
    at = open_page("thresholds")
    assert "From good images only" in texts(at) and "28 good training images" in texts(at)
    # 28 cross-fitted images cannot show 1%: the rate starts at the lowest they can, 1 in 29.
    expected = normal_threshold(cal.scores, 0.0345)
    assert float(metric(at, "Threshold from good images")) == pytest.approx(expected.threshold, rel=1e-3)
    assert metric(at, "Good parts rejected") == f"{expected.expected_rate:.2%}"
    specs = " ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "estimated from synthetic defects" in specs and "measured on the test set" in specs
    at.number_input(key=f"false_reject_{run_id}").set_value(20.0).run()
    lower = normal_threshold(cal.scores, 0.2)
    assert float(metric(at, "Threshold from good images")) == pytest.approx(lower.threshold, rel=1e-3)
    next(b for b in at.button if b.label == "Use this threshold below").click().run()
    assert float(metric(at, "Threshold")) == pytest.approx(lower.threshold, rel=1e-3)
    at.number_input(key=f"false_reject_{run_id}").set_value(0.5).run()
    assert "tail fit needs at least 30" in texts(at)                       # said, not a traceback


def test_a_run_without_a_test_set_is_thresholded_from_good_images(workspace):
    from core.data import load_folder
    from core.pipeline import register_dataset, train_run
    store = workspace["store"]
    normals = load_folder(DEMO / "train" / "good")
    dataset_id = register_dataset(store, normals, "folder", "good nuts only")
    run_id = train_run(store, dataset_id, normals, "patchcore", {"coreset_ratio": 0.05, "resize": 128,
                                                                  "score_border": 0})
    assert store.get_run(run_id)["thresholds"]["preset"] == "false_reject_rate"
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["pending_selection"] = (dataset_id, run_id)
    at.run()
    at.switch_page("app_pages/thresholds.py").run()
    assert not at.exception and "no test set" in texts(at)
    at.number_input(key=f"false_reject_{run_id}").set_value(10.0).run()
    shown = float(metric(at, "Threshold from good images"))
    next(b for b in at.button if b.label.startswith("Save threshold")).click().run()
    saved = store.get_run(run_id)["thresholds"]
    assert saved["image"] == pytest.approx(shown, rel=1e-3) and saved["preset"] == "false_reject_rate"


def test_threshold_move_for_1000_images_is_fast(workspace, tmp_path):
    run_id = synthetic_run(workspace["store"], tmp_path)
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["pending_selection"] = (workspace["store"].get_run(run_id)["dataset_id"], run_id)
    at.run()
    at.switch_page("app_pages/thresholds.py").run()
    assert "1000 test images" in texts(at).replace(" normal and ", "+") or "anomalous test images" in texts(at)
    drawn = slider(at, f"slider_image_{run_id}")
    timings, shown = [], []
    for value in np.linspace(0.9, 1.8, 8):
        start = time.perf_counter()
        move_slider(at, f"slider_image_{run_id}", value)
        timings.append(time.perf_counter() - start)
        shown.append((metric(at, "Threshold"), metric(at, "False alarms"), metric(at, "Recall")))
    assert len(set(shown)) == 8                        # every move changed the numbers
    print(f"\nwhole Thresholds page rerun after a slider move, 1,000 images: median "
          f"{1000 * np.median(timings):.0f} ms")
    assert drawn["max"] > drawn["min"]


def tiles(at: AppTest) -> list[str]:
    """Each gallery tile's badges (outcome, defect type, the user's mark), in the gallery's order."""
    return [m.value for m in at.markdown if m.value.startswith(":") and "-badge[" in m.value]


def open_tile(at: AppTest, i: int) -> None:
    next(b for b in at.button if b.key == f"open_{i}").click().run()


def test_heatmaps_gallery_filters_and_detail(workspace):
    at = open_page("heatmaps")
    assert "17 caught defects" in texts(at) and "showing 23" in texts(at)
    buttons = [b for b in at.button if b.key and b.key.startswith("open_")]
    assert len(buttons) == 23 and len(tiles(at)) == 23 and not at.subheader       # no detail before a click
    assert tiles(at)[0] == ":blue-badge[caught defect] :gray-badge[colour]"          # the defect type on the tile
    assert tiles(at)[-1] == ":green-badge[correct OK] :gray-badge[good]"
    buttons[-1].click().run()                                  # the detail opens in a dialog, over the page
    assert at.subheader[0].value.startswith("good/") and metric(at, "Verdict") == "OK"
    assert metric(at, "Truth") == "good" and "A good image passed as OK." in texts(at)
    at.slider(key="heatmap_alpha").set_value(0.9).run()
    assert not at.exception and at.subheader[0].value.startswith("good/")     # still open
    at.session_state["heatmap_detail"] = None                  # what closing the dialog does (on_dismiss)
    at.button_group(key="heatmap_outcomes").set_value(["false alarm"]).run()
    assert "No test image matches these filters." in texts(at) and not at.subheader


def test_heatmap_filters_are_kept_when_the_user_leaves_the_page_and_comes_back(workspace):
    at = open_page("heatmaps")
    at.button_group(key="heatmap_outcomes").set_value(["caught defect", "correct OK"]).run()
    at.radio(key="heatmap_order").set_value("lowest first").run()
    assert "showing 23" in texts(at) and tiles(at)[0].startswith(":green-badge[correct OK]")
    at.button_group(key=f"heatmap_defects_{workspace['run_id']}").set_value(["good"]).run()
    assert "showing 6" in texts(at)
    at.switch_page("app_pages/compare.py").run()
    at.switch_page("app_pages/heatmaps.py").run()
    assert at.button_group(key="heatmap_outcomes").value == ["caught defect", "correct OK"]
    assert at.radio(key="heatmap_order").value == "lowest first" and "showing 6" in texts(at)


def test_a_missed_defect_is_red_marked_defective_and_an_ng_image_without_defect_pixels_shows_its_hottest_region(
        workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    scores = store.run_scores(run_id).query("split == 'test'")
    defects = np.sort(scores.query("label == 1")["score"].to_numpy())
    store.set_threshold(run_id, image=float(defects[2:4].mean()), pixel=1e9)   # the 3 lowest defects are missed
    at = open_page("heatmaps")
    assert "3 missed defects" in texts(at) and "0 false alarms" in texts(at)
    missed = [t for t in tiles(at) if "missed defect" in t]
    assert missed == [":red-badge[missed defect] :gray-badge[colour]"] * 3 and not any("green-badge[missed" in t
                                                                                       for t in tiles(at))
    order = np.argsort(-scores["score"].to_numpy(), kind="stable")
    open_tile(at, int(order[-7]))                              # the lowest defect (the 6 good images score lower)
    assert "A defective image passed as OK." in texts(at)
    score = next(m for m in at.metric if m.label == "Score")
    assert score.proto.delta.startswith("-") and score.proto.color == MetricProto.MetricColor.RED   # not green
    mark = next(b for b in at.button if b.key == "mark_defective")
    assert mark.proto.type == "primary"
    mark.click().run()
    [said] = store.get_dataset(workspace["dataset_id"])["feedback"]
    assert (said["verdict"], said["run_id"]) == ("defective", run_id) and "You marked it **defective**" in texts(at)
    assert ":red-badge[missed defect] :gray-badge[colour] :violet-badge[marked defective]" in tiles(at)
    next(b for b in at.button if b.key == "feedback_undo").click().run()
    assert store.get_dataset(workspace["dataset_id"])["feedback"] == [] and not any("marked" in t for t in tiles(at))
    at.session_state["heatmap_detail"] = None
    open_tile(at, int(order[0]))                               # NG, with no pixel anywhere near 1e9
    captions = [c for image in at.image for c in image.captions]
    assert metric(at, "Verdict") == "NG" and any("the hottest region (magenta)" in c for c in captions)


def test_a_false_alarm_marked_good_is_recorded_listed_counted_and_undone(workspace):
    store, run_id, dataset_id = workspace["store"], workspace["run_id"], workspace["dataset_id"]
    scores = store.run_scores(run_id).query("split == 'test'").reset_index(drop=True)
    good = np.sort(scores.query("label == 0")["score"].to_numpy())
    store.set_threshold(run_id, image=float(good[-2:].mean()))   # the highest-scoring good image is a false alarm
    at = open_page("heatmaps")
    assert "1 false alarm]" in texts(at)
    alarm = int(scores.query("label == 0")["score"].idxmax())
    open_tile(at, alarm)
    assert "A good image judged NG." in texts(at)
    mark = next(b for b in at.button if b.key == "mark_good")
    assert mark.proto.type == "primary"
    mark.click().run()
    assert not at.exception, at.exception
    [said] = store.get_dataset(dataset_id)["feedback"]
    assert (said["path"], said["verdict"], said["run_id"]) == (scores["path"][alarm], "good", run_id)
    assert "You marked it **good**" in texts(at) and ":violet-badge[marked good]" in " ".join(tiles(at))

    at.session_state["heatmap_detail"] = None
    at.switch_page("app_pages/train.py").run()
    assert "29 normal training images (1 added as good from the Heatmaps page), 22 test images" in texts(at)
    at.switch_page("app_pages/datasets.py").run()
    assert "Marked on the Heatmaps page: 1" in texts(at)
    counts = at.dataframe[0].value
    assert counts.query("split == 'train'")["images"].sum() == 29
    at.multiselect(key="undo_feedback").set_value([said["path"]]).run()
    next(b for b in at.button if b.key == "undo_feedback_button").click().run()
    assert store.get_dataset(dataset_id)["feedback"] == [] and "Marked on the Heatmaps page" not in texts(at)


def test_features_shows_coreset_and_embedding_maps(workspace, tmp_path, monkeypatch):
    store, run_id = workspace["store"], workspace["run_id"]
    folder = tmp_path / "model"
    shutil.copytree(store.get_run(run_id)["model_path"], folder)
    with store._write() as conn:
        conn.execute("UPDATE runs SET model_path = ? WHERE id = ?", (str(folder), run_id))
    at = open_page("features")
    assert metric(at, "Coreset size").endswith("patches")
    assert any(b.label == "Compute embedding maps" for b in at.button)
    # UMAP's first call compiles for half a minute (its layout is checked in test_embeddings.py): PCA stands in,
    # held back until the test has left the page and come back, so the job is surely still running then.
    release = threading.Event()

    def held_layout(vectors, seed):
        assert release.wait(60), "the test never released the layout"
        return embeddings._pca(vectors)

    monkeypatch.setattr(embeddings, "_layout", held_layout)
    next(b for b in at.button if b.label == "Compute embedding maps").click().run()
    job = server_jobs().latest("embedding", run_id=run_id)
    wait_until(lambda: any(s.stage == "layout" for s in job.snapshot().stages), 60, "the maps never reached UMAP")
    at.switch_page("app_pages/compare.py").run()
    back = open_page("features")                       # another session, as after a reload: the job is found
    assert any("Feature maps of run #1" in m.value for m in back.markdown)
    assert not any(b.label == "Compute embedding maps" for b in back.button)
    release.set()
    wait_until(lambda: not job.snapshot().running, 60, "the maps never finished")
    at = back
    at.run()
    assert not at.exception, at.exception
    assert (folder / embeddings.VIEWS_FILE).is_file()
    assert [s.value for s in at.subheader][-2:] == ["Images", "Patches"]
    assert len(at.get("plotly_chart")) == 4            # coverage, memory bank, images, patches
    at.radio(key="colour_images").set_value("score").run()
    assert not at.exception


def test_compare_lists_runs_and_deploys(workspace):
    at = open_page("compare")
    table = at.dataframe[0].value
    assert table["run"].tolist() == ["#1 patchcore"] and table["image AUROC"].iloc[0] == 1.0
    assert table["memory MB"].iloc[0] > 0 and table["ms per image"].iloc[0] > 0
    assert (table["false alarms"].iloc[0], table["missed defects"].iloc[0]) == (0, 0)   # at its F1-max threshold
    assert (table["good tested"].iloc[0], table["defective tested"].iloc[0]) == (6, 17)
    at.multiselect(key="compare_columns").unselect("backbone").run()
    assert "backbone" not in at.dataframe[0].value and "false alarms" in at.dataframe[0].value
    assert "No run is deployed" in texts(at)
    next(b for b in at.button if b.label == "Deploy this run").click().run()
    assert workspace["store"].deployed_run(workspace["dataset_id"]) is None          # not before the confirmation
    assert "0 false alarm(s) among 6 good and missed 0 of 17" in texts(at)
    next(b for b in at.button if b.key == "cancel_deploy").click().run()
    assert workspace["store"].deployed_run(workspace["dataset_id"]) is None
    assert not any(b.key == "confirm_deploy" for b in at.button)
    next(b for b in at.button if b.label == "Deploy this run").click().run()
    next(b for b in at.button if b.label == "Yes, deploy #1 patchcore").click().run()
    assert workspace["store"].deployed_run(workspace["dataset_id"])["id"] == workspace["run_id"]
    assert "Deployed now: **#1 patchcore**" in texts(at)


def test_inspect_gives_a_verdict_for_an_upload_and_rejects_junk(workspace):
    at = open_page("inspect_live")
    assert "Upload an image or take a photo" in texts(at)
    bad = DEMO / "test" / "colour" / "00.jpg"
    at.file_uploader(key="inspect_upload").set_value((bad.name, bad.read_bytes(), "image/jpeg")).run()
    assert not at.exception, at.exception
    assert ">NG<" in texts(at) and "answered in" in texts(at)
    assert len(at.image) == 2
    good = next((DEMO / "test" / "good").iterdir())
    at.file_uploader(key="inspect_upload").set_value((good.name, good.read_bytes(), "image/jpeg")).run()
    assert ">OK<" in texts(at)
    at.file_uploader(key="inspect_upload").set_value(("x.png", b"not a png", "image/png")).run()
    assert "cannot be inspected" in at.error[0].value


def test_inspect_names_the_run_it_scores_the_selected_one_unless_the_deployed_one_is_chosen(workspace):
    store, copy = workspace["store"], copied_run(workspace)
    store.set_deployed(workspace["dataset_id"], workspace["run_id"])
    store.set_threshold(copy["id"], image=1e9)                 # the copy passes everything: which run scored shows
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["pending_selection"] = (workspace["dataset_id"], copy["id"])
    at.run()
    at.switch_page("app_pages/inspect_live.py").run()
    assert f"Scoring with **run #{copy['id']} · copy · patchcore**: the run selected in the sidebar, not the " \
           "deployed one" in texts(at)
    bad = DEMO / "test" / "colour" / "00.jpg"
    at.file_uploader(key="inspect_upload").set_value((bad.name, bad.read_bytes(), "image/jpeg")).run()
    assert ">OK<" in texts(at)                                 # the copy's threshold, not the deployed run's
    at.radio(key="inspect_source").set_value("deployed").run()
    assert f"Scoring with **run #{workspace['run_id']} · patchcore**: the deployed run of hazelnut_toy" \
           in texts(at) and ">NG<" in texts(at)


def test_two_sessions_tune_thresholds_without_touching_each_other(workspace):
    run_id = workspace["run_id"]
    saved = workspace["store"].get_run(run_id)["thresholds"]["image"]
    first, second = open_page("thresholds"), open_page("thresholds")
    move_slider(first, f"slider_image_{run_id}", slider(first, f"slider_image_{run_id}")["min"])
    second.run()
    assert metric(first, "False alarms") == "6" and metric(second, "False alarms") == "0"
    assert float(metric(second, "Threshold")) == pytest.approx(saved, rel=1e-3)
    assert workspace["store"].get_run(run_id)["thresholds"]["image"] == saved    # nothing saved by moving


def test_a_damaged_registry_is_explained_on_the_page_not_a_traceback(tmp_path):
    from core.runs import REGISTRY_FILENAME
    from core.workspace import workspace_dir
    workspace_dir().mkdir(parents=True, exist_ok=True)
    (workspace_dir() / REGISTRY_FILENAME).write_text("not a database")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    assert "not a usable AnomalyScope registry" in at.error[0].value


def test_a_damaged_model_folder_is_explained_on_the_page_not_a_traceback(workspace, tmp_path):
    import sqlite3
    run = workspace["store"].get_run(workspace["run_id"])
    damaged = tmp_path / "damaged-model"
    shutil.copytree(run["model_path"], damaged)
    (damaged / "fitted.safetensors").write_bytes(b"cut short")
    with sqlite3.connect(workspace["store"].path) as conn:
        conn.execute("UPDATE runs SET model_path = ? WHERE id = ?", (str(damaged), run["id"]))
    at = open_page("inspect_live")
    assert f"Run #{run['id']} cannot be used" in at.error[0].value and plain(str(damaged)) in at.error[0].value


def test_defect_rules_are_set_saved_and_clear_a_verdict_outside_the_roi(workspace):
    from core.rules import DefectRules
    store, run_id = workspace["store"], workspace["run_id"]
    bad = DEMO / "test" / "colour" / "00.jpg"          # its defect is in the middle of the nut
    at = open_page("inspect_live")
    at.file_uploader(key="inspect_upload").set_value((bad.name, bad.read_bytes(), "image/jpeg")).run()
    assert ">NG<" in texts(at) and "Why: defect" not in texts(at)     # no rules: the score decides
    at.switch_page("app_pages/thresholds.py").run()
    assert "Defect rules" in texts(at) and "Saved: no defect rules" in texts(at)
    at.radio(key=f"roi_source_{run_id}").set_value("Upload a mask").run()
    black = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(black, format="PNG")
    at.file_uploader(key=f"roi_mask_{run_id}").set_value(("black.png", black.getvalue(), "image/png")).run()
    assert "black everywhere" in at.error[0].value
    left_quarter = np.zeros((64, 64), np.uint8)
    left_quarter[:, :16] = 255
    mask = io.BytesIO()
    Image.fromarray(left_quarter).save(mask, format="PNG")
    at.file_uploader(key=f"roi_mask_{run_id}").set_value(("roi.png", mask.getvalue(), "image/png")).run()
    at.number_input(key=f"min_area_{run_id}").set_value(30.0).run()
    assert not at.exception, at.exception
    next(b for b in at.button if b.label.startswith("Save rules")).click().run()
    saved = DefectRules.of_run(store.get_run(run_id))
    assert saved.min_area == 30 and saved.roi[:, :16].all() and not saved.roi[:, 16:].any()
    assert "Saved: region of interest (25% of the image), minimum defect area 30 px" in texts(at)

    at.switch_page("app_pages/inspect_live.py").run()
    at.file_uploader(key="inspect_upload").set_value((bad.name, bad.read_bytes(), "image/jpeg")).run()
    assert ">OK<" in texts(at) and "outside the region of interest" in texts(at)
    at.switch_page("app_pages/heatmaps.py").run()
    assert not at.exception, at.exception
    assert "Defect rules: region of interest (25% of the image)" in texts(at)


def test_suspicious_training_images_are_listed_left_out_and_restored(workspace, tmp_path):
    from core.data import load_mvtec
    from core.pipeline import register_dataset, train_run
    store = workspace["store"]
    at = open_page("datasets")
    assert "No audit of this dataset yet" in texts(at)
    assert any(b.label == "Check the training images" for b in at.button)

    root = tmp_path / "nuts"
    shutil.copytree(DEMO, root)
    planted = sorted((root / "test" / "colour").iterdir())[:2]
    for source in planted:
        shutil.move(source, root / "train" / "good" / f"planted_{source.name}")
    dataset = load_mvtec(root)
    dataset_id = register_dataset(store, dataset, "mvtec", "dirty nuts")
    params = {"resize": 128, "coreset_ratio": 0.1, "score_border": 0, "calibration_fraction": 0}
    run_id = train_run(store, dataset_id, dataset, "patchcore", params, audit="flag")
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["pending_selection"] = (dataset_id, run_id)
    at.run()
    at.switch_page("app_pages/datasets.py").run()
    assert not at.exception, at.exception
    assert "Suspicious training images" in texts(at) and f"From run #{run_id}" in texts(at)
    ticked = [c.key.split("_", 3)[-1] for c in at.checkbox if c.key.startswith("leave_out_") and c.value]
    assert {p.split("/")[-1] for p in ticked} >= {f"planted_{s.name}" for s in planted}
    refit = next(b for b in at.button if b.key == "leave_out_and_refit")
    assert refit.label == f"Leave out {len(ticked)} image{'s' if len(ticked) != 1 else ''} and refit"
    refit.click().run()
    assert at.title[0].value == "Train" and "Training patchcore on dirty nuts…" in texts(at)   # its progress
    assert set(store.get_dataset(dataset_id)["excluded"]) == set(ticked)
    at.switch_page("app_pages/train.py")     # AppTest reruns the page it was told last, not the one switched to
    wait_for_job(at)
    new_run = store.list_runs(dataset_id)[0]
    assert new_run["id"] != run_id and new_run["model_card"]["n_images"] == 30 - len(ticked)
    assert new_run["model_card"]["left_out_by_user"] == len(ticked)

    at.switch_page("app_pages/datasets.py").run()
    assert f"Left out of training: {len(ticked)}" in texts(at)
    at.multiselect(key="restore_images").set_value(ticked[:1]).run()
    next(b for b in at.button if b.key == "restore_button").click().run()
    assert set(store.get_dataset(dataset_id)["excluded"]) == set(ticked[1:])


def test_cpr_is_trained_from_the_train_page_and_compared(workspace):
    at = open_page("train")
    next(s for s in at.selectbox if s.label == "Detector").set_value("cpr").run()
    labels = {w.label for w in [*at.number_input, *at.checkbox, *at.text_input]}
    assert {"n_neighbours", "windows", "foreground", "top_share"} <= labels
    next(t for t in at.text_input if t.label == "resize").set_value("128").run()
    next(n for n in at.number_input if n.label == "calibration_fraction").set_value(0.0).run()
    next(b for b in at.button if b.label == "Train").click().run()
    wait_for_job(at)
    assert "is ready" in texts(at)
    run = workspace["store"].list_runs()[0]
    assert run["detector"] == "cpr" and run["metrics"]["image_auroc"] > 0.9
    at.switch_page("app_pages/compare.py").run()
    table = at.dataframe[0].value
    assert set(table["run"]) == {"#1 patchcore", f"#{run['id']} cpr"}


def test_a_pad_run_shows_the_good_view_it_aligned_beside_the_test_image(workspace):
    from core.data import load_mvtec
    from core.pipeline import train_run
    train_run(workspace["store"], workspace["dataset_id"], load_mvtec(DEMO), "pad",
              {"resize": 128, "n_candidates": 4, "n_references": 2, "calibration_fraction": 0.0})
    at = open_page("heatmaps")                                 # the newest run is selected: the pad one
    open_tile(at, 0)
    captions = [c for image in at.image for c in image.captions]
    assert not at.exception and any(c.startswith("Nearest good training view #") for c in captions)
    assert any(c.startswith("That view aligned to the test image: ") for c in captions)


def test_a_new_variant_from_three_good_images_gets_a_regad_model_and_a_threshold():
    """The few-shot path: upload 3 good images and nothing else, pick RegAD with a registration trained on
    other products, train: the run comes with a threshold set from its good images alone."""
    from core.detectors.regad import train_registration
    from core.workspace import registrations_dir
    good = sorted((DEMO / "train" / "good").iterdir())
    others = [np.asarray(Image.open(p).convert("RGB")) for p in good[3:9]]
    train_registration({"other": others}, registrations_dir() / "trained_on_other.safetensors", size=64, steps=1,
                       batch_pairs=2, log=lambda m: None)
    at = open_page("datasets")
    at.text_input(key="name_0").set_value("new variant")
    at.file_uploader(key="normal_0").set_value([(p.name, p.read_bytes(), "image/jpeg") for p in good[:3]])
    next(b for b in at.button if b.label == "Create dataset").click().run()
    assert "is ready" in texts(at)
    at.switch_page("app_pages/train.py").run()
    next(s for s in at.selectbox if s.label == "Detector").set_value("regad").run()
    assert at.selectbox(key="regad_registration").value == "trained_on_other.safetensors"
    next(n for n in at.number_input if n.label == "resize").set_value(128).run()
    next(b for b in at.button if b.label == "Train").click().run()
    wait_for_job(at)
    assert "is ready" in texts(at)
    run = RunStore().list_runs()[0]
    assert run["detector"] == "regad" and run["params"]["registration"].endswith("trained_on_other.safetensors")
    assert run["thresholds"]["image"] is not None and run["thresholds"]["preset"] == "false_reject_rate"


def test_a_dataset_whose_folder_is_gone_stops_every_page_with_the_reason(tmp_path):
    import shutil
    from core.app.uploads import register_folder
    line = tmp_path / "line"
    line.mkdir()
    for p in sorted((DEMO / "train" / "good").iterdir())[:3]:
        shutil.copy(p, line)
    register_folder(RunStore(), line, "moved away")
    shutil.rmtree(line)
    for page in ("train", "datasets"):            # every page asks through state.dataset_images
        at = open_page(page)                      # asserts no exception reached the page
        assert any("'moved away' cannot be opened any more" in e.value for e in at.error), (page, texts(at))


# -- renaming and deleting ------------------------------------------------------------------------------------
def copied_run(workspace) -> dict:
    """A second run on the demo set whose model folder is this test's own copy (the trained one is shared)."""
    from core.pipeline import models_dir
    store, trained = workspace["store"], workspace["store"].get_run(workspace["run_id"])
    folder = models_dir() / "patchcore-copy"
    shutil.copytree(trained["model_path"], folder)
    run_id = store.add_run(dataset_id=workspace["dataset_id"], detector="patchcore", params=trained["params"],
                           model_path=str(folder), metrics=trained["metrics"], timings=trained["timings"],
                           model_card=trained["model_card"], thresholds={"image": trained["thresholds"]["image"]},
                           scores=store.run_scores(trained["id"]).to_dict("records"), name="copy")
    return store.get_run(run_id)


def button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def test_a_run_is_renamed_then_deleted_with_its_model_folder_after_a_confirmation(workspace):
    store, run = workspace["store"], copied_run(workspace)
    store.set_deployed(workspace["dataset_id"], run["id"])
    at = open_page("compare")
    at.selectbox(key="manage_run").set_value(run["id"]).run()
    at.text_input(key=f"rename_run_{run['id']}").set_value("night shift").run()
    button(at, "rename_run").click().run()
    assert store.get_run(run["id"])["name"] == "night shift" and f"Run #{run['id']} renamed" in texts(at)
    assert button(at, "delete_run").disabled                          # not before the confirmation
    confirm = at.checkbox(key=f"confirm_delete_run_{run['id']}")
    assert "although it is the deployed run" in confirm.label         # a deployed run says so in the confirmation
    confirm.check().run()
    button(at, "delete_run").click().run()
    assert not at.exception, at.exception
    with pytest.raises(KeyError):
        store.get_run(run["id"])
    assert not Path(run["model_path"]).exists()                       # the model files went with it
    assert Path(store.get_run(workspace["run_id"])["model_path"]).is_dir()   # and nothing of the other run
    assert f"Deleted #{run['id']} night shift and its model files" in texts(at)
    assert at.dataframe[0].value["run"].tolist() == [f"#{workspace['run_id']} patchcore"]


def test_a_dataset_is_renamed_then_deleted_with_its_runs_and_their_models(workspace):
    store, run = workspace["store"], copied_run(workspace)
    at = open_page("datasets")
    at.text_input(key=f"rename_dataset_{workspace['dataset_id']}").set_value("hazelnuts, line 2").run()
    button(at, "rename_dataset").click().run()
    assert store.get_dataset(workspace["dataset_id"])["name"] == "hazelnuts, line 2"
    assert at.header[0].value == "hazelnuts, line 2"
    assert button(at, "delete_dataset").disabled
    at.checkbox(key=f"confirm_delete_dataset_{workspace['dataset_id']}").check().run()
    button(at, "delete_dataset").click().run()
    assert not at.exception, at.exception
    assert store.list_datasets() == [] and store.list_runs() == []
    assert not Path(run["model_path"]).exists()
    assert DEMO.is_dir()                               # a folder registered in place keeps its files
    assert "Deleted 'hazelnuts, line 2' and 2 runs" in texts(at) and "No dataset yet" in texts(at)


def test_archived_datasets_and_runs_leave_the_lists_until_shown_and_come_back(workspace):
    store, run = workspace["store"], copied_run(workspace)
    at = open_page("compare")
    at.selectbox(key="manage_run").set_value(run["id"]).run()
    button(at, "archive_run").click().run()
    assert store.get_run(run["id"])["archived"] and Path(run["model_path"]).is_dir()   # kept, files and all
    assert at.dataframe[0].value["run"].tolist() == [f"#{workspace['run_id']} patchcore"]
    assert at.sidebar.selectbox(key="run_id").options == [f"#{workspace['run_id']} patchcore · AUROC 1.000"]
    at.switch_page("app_pages/datasets.py").run()
    button(at, "archive_dataset").click().run()
    assert store.get_dataset(workspace["dataset_id"])["archived"]
    assert "Every dataset is archived" in " ".join(c.value for c in at.sidebar.caption)
    at.sidebar.toggle(key="show_archived").set_value(True).run()
    assert at.header[0].value == "hazelnut_toy"                      # listed again, and restorable
    button(at, "archive_dataset").click().run()
    assert not store.get_dataset(workspace["dataset_id"])["archived"] and not at.exception


def test_the_demo_again_reuses_its_dataset_and_run_instead_of_training_a_copy(workspace):
    at = open_page()
    next(b for b in at.button if b.label == "Run the demo").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Heatmaps" and not server_jobs().jobs()
    store = workspace["store"]
    assert [d["id"] for d in store.list_datasets()] == [workspace["dataset_id"]]
    assert [r["id"] for r in store.list_runs()] == [workspace["run_id"]]

"""Core pieces behind the pages: training jobs, parameter specs, the report, the run table, live inspection."""
import inspect
import re

import pytest
from conftest import wait_until

from core.app.compare import run_table
from core.data import load_mvtec, read_image
from core.detectors import get_detector_class, load_detector
from core.line.inspector import Inspector
from core.pipeline import models_dir, run_results
from core.app.report import borderline_images, build_report
from core.runs import RunStore
from core.app.jobs import TrainingJob
from core.params import param_specs, parse_value
from core.workspace import DEMO_DIR

DEMO = DEMO_DIR / "hazelnut_toy"


def test_param_specs_carry_defaults_types_and_help():
    specs = {s.name: s for s in param_specs("patchcore")}
    defaults = inspect.signature(get_detector_class("patchcore")).parameters
    assert specs["coreset_ratio"].default == defaults["coreset_ratio"].default and specs["coreset_ratio"].kind == "literal"
    assert parse_value(specs["coreset_ratio"], "0.05") == 0.05 and specs["blur_sigma"].kind == "float"
    assert "memory bank" in specs["coreset_ratio"].help
    assert specs["reweight"].kind == "bool" and specs["stages"].kind == "literal"
    assert specs["seed"].help                                          # filled from the shared texts
    assert parse_value(specs["stages"], "(1, 2)") == (1, 2) and parse_value(specs["weights"], "None") is None
    # "auto" parameters take a word, a number or a tuple
    assert specs["resize"].kind == "literal" and parse_value(specs["resize"], "auto") == "auto"
    assert parse_value(specs["resize"], "384") == 384 and parse_value(specs["resize"], "(256, 512)") == (256, 512)


def test_the_fit_says_what_it_chose_from_the_data(workspace):
    from core.app.jobs import chosen_settings
    card = workspace["store"].get_run(workspace["run_id"])["model_card"]
    frame, bank, auto = chosen_settings(card)       # the demo sets resize and coreset_ratio; score_border is auto
    assert frame.startswith("Input frame 256 x 256 px") and "aspect ratio" in frame
    assert "stretched" in chosen_settings({**card, "aspect_stretch": 1.8})[0]
    assert bank.startswith(f"Memory bank: {card['memory_bank']['patches']:,} of") and "exact" in bank
    assert auto.startswith("Chosen automatically: ") and "image scored" in auto and "input" not in auto


def test_a_wait_that_never_ends_fails_clearly_instead_of_hanging():
    with pytest.raises(AssertionError, match="the job never started a stage within 0.2 s"):
        wait_until(lambda: False, 0.2, "the job never started a stage")


def test_a_cancelled_training_registers_nothing():
    store = RunStore()
    dataset = load_mvtec(DEMO)
    dataset_id = store.add_dataset("demo", str(DEMO), "mvtec", {}, {})
    job = TrainingJob(store, dataset_id, dataset, "patchcore", {"coreset_ratio": 0.05, "resize": 256}).start()
    wait_until(lambda: job.snapshot().stages, 120, "the training job never started a stage")  # really under way
    job.cancel()
    snapshot = job.wait(120)
    assert snapshot.status == "cancelled" and snapshot.run_id is None
    assert store.list_runs() == []
    assert not models_dir().exists() or not any(models_dir().iterdir())


def test_a_saved_model_registers_as_a_new_run(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    dataset = load_mvtec(DEMO)
    folder = store.get_run(run_id)["model_path"]
    snapshot = TrainingJob(store, workspace["dataset_id"], dataset, model_folder=folder, name="reloaded").start().wait(120)
    assert snapshot.status == "done", snapshot.error
    assert snapshot.stages[-1].stage == "score" and snapshot.stages[-1].fraction == 1.0
    new = store.get_run(snapshot.run_id)
    assert new["name"] == "reloaded" and new["model_path"] != folder
    assert new["metrics"]["image_auroc"] == pytest.approx(store.get_run(run_id)["metrics"]["image_auroc"])
    table = run_table(store, workspace["dataset_id"])
    assert list(table["id"]) == [snapshot.run_id, run_id]
    # The backbone's weights count (EfficientNet-Lite0 up to stage 3: about 2 MB of them).
    assert (table["memory MB"] > table["model MB"] + 1.5).all() and (table["model MB"] > 0).all()


def test_report_is_self_contained_with_metrics_curves_and_images(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    run, results = store.get_run(run_id), run_results(store, run_id)
    threshold = run["thresholds"]["image"]
    text = build_report(run, results, threshold, run["thresholds"]["pixel"], "f1_max")
    assert f"{run['metrics']['image_auroc']:.3f}" in text and f"{threshold:.4g}" in text
    assert "ROC curve (images)" in text and "Confusion matrix" in text and "F1-max on the test set" in text
    assert len(re.findall(r"<img src='data:image/png;base64,", text)) >= 3 * 6
    assert "<script src=" not in text and "plotly" in text                 # plotly.js inline, nothing fetched
    assert "17 of 17</b> defective test images caught" in text
    under, over = borderline_images(results.scores, threshold)
    assert "Borderline, just under the threshold (OK)" in text and "Borderline, at or just over" in text
    for i in [*under, *over]:                                             # each with its card
        assert f"<b>{results.name(i)}</b> · score {results.scores[i]:.4g}" in text
    assert {int(results.labels[i]) for i in under} == {0} and {int(results.labels[i]) for i in over} == {1}


def test_borderline_images_are_the_nearest_on_each_side_of_the_threshold():
    scores = [0.9, 0.2, 0.5, 0.45, 0.7, 0.1, 0.5]
    under, over = borderline_images(scores, 0.5, k=2)
    assert under.tolist() == [3, 1]          # 0.45, then 0.2: the highest that pass
    assert over.tolist() == [2, 6]           # 0.5 and 0.5 (at the threshold is NG), before 0.7 and 0.9
    under, over = borderline_images(scores, 1.0, k=3)
    assert under.tolist() == [0, 4, 2] and over.tolist() == []


def test_inspect_answers_within_a_second_with_a_map_at_input_size(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    detector = load_detector(store.get_run(run_id)["model_path"])
    threshold = store.get_run(run_id)["thresholds"]["image"]
    inspector = Inspector(detector, threshold)
    inspector.warm_up()
    good, bad = read_image(next((DEMO / "test" / "good").iterdir())), read_image(DEMO / "test" / "colour" / "00.jpg")
    verdicts = [inspector.inspect(image) for image in (good, bad)]
    assert [v.label for v in verdicts] == ["OK", "NG"]
    assert verdicts[0].map.shape == good.shape[:2]
    # The best of a few answers: what the machine can do, not how busy its other tenants are.
    assert min(inspector.inspect(bad).seconds for _ in range(3)) < 1.0


def test_mistakes_at_a_threshold_count_only_labelled_test_images():
    import pandas as pd
    from core.app.compare import mistakes_at
    scores = pd.DataFrame({"path": list("abcdefg"),
                           "split": ["test", "test", "test", "test", "test", "calibration", "test"],
                           "label": pd.array([0, 0, 1, 1, 0, 0, None], dtype="Int64"),
                           "defect": ["good", "good", "crack", "crack", "good", "good", None],
                           "score": [0.2, 0.6, 0.5, 0.9, 0.5, 0.99, 0.95]})
    # at 0.5: good 0.6 and 0.5 flagged (at the threshold is NG); crack 0.5 and 0.9 caught; the calibration's
    # 0.99 and the unlabelled 0.95 are not test mistakes
    assert mistakes_at(scores, 0.5) == {"false alarms": 2, "missed defects": 0, "good tested": 3,
                                        "defective tested": 2}
    assert mistakes_at(scores, 0.7)["false alarms"] == 0 and mistakes_at(scores, 0.7)["missed defects"] == 1
    assert mistakes_at(scores, None)["false alarms"] is None

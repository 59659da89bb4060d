"""Feedback from the heatmaps: what a user says a test image is is recorded in the registry, and the next fit of
the dataset trains on images marked good and never on images marked defective."""
import sqlite3

import pytest

from conftest import DEMO

from core.data import MARKED_DEFECTIVE, load_mvtec
from core.pipeline import open_dataset, register_dataset, train_run
from core.runs import SCHEMA_VERSION, RunStore, _SCHEMA

FAST = {"resize": 64, "coreset_ratio": 0.05, "score_border": 0, "calibration_fraction": 0}
FALSE_ALARM = str(DEMO / "test" / "good" / "04.jpg")       # a good test image, as the heatmaps name it
MISSED = str(DEMO / "test" / "colour" / "00.jpg")
TRAINING = str(DEMO / "train" / "good" / "00.jpg")


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "registry.sqlite")


def test_feedback_is_recorded_with_time_and_run_replaced_undone_and_deleted_with_its_dataset(store):
    ds = store.add_dataset("nuts", str(DEMO), "mvtec", {}, {})
    assert store.get_dataset(ds)["feedback"] == []
    store.set_feedback(ds, FALSE_ALARM, "defective", run_id=3)
    store.set_feedback(ds, MISSED, "defective")
    store.set_feedback(ds, FALSE_ALARM, "good", run_id=4)        # a second word on an image replaces the first
    feedback = store.get_dataset(ds)["feedback"]
    assert [(f["path"], f["verdict"], f["run_id"]) for f in feedback] == [(FALSE_ALARM, "good", 4),
                                                                         (MISSED, "defective", None)]
    assert all(f["time"].endswith("+00:00") for f in feedback)
    assert store.find_dataset("nuts")["feedback"] == feedback == store.list_datasets()[0]["feedback"]
    other = store.add_dataset("other", "/x", "folder", {}, {})
    assert store.get_dataset(other)["feedback"] == []             # feedback belongs to one dataset
    with pytest.raises(ValueError, match="feedback must be one of"):
        store.set_feedback(ds, MISSED, "ok")
    with pytest.raises(KeyError):
        store.set_feedback(999, MISSED, "good")
    store.remove_feedback(ds, [FALSE_ALARM])
    assert [f["path"] for f in store.get_dataset(ds)["feedback"]] == [MISSED]
    store.delete_dataset(ds)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM image_feedback").fetchone()[0] == 0


def test_a_version_5_registry_gains_the_feedback_table_and_keeps_its_datasets(tmp_path):
    path = tmp_path / "v5.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA[:_SCHEMA.index("-- what the user says")])
        conn.execute("INSERT INTO datasets (name, source, kind, created) VALUES ('d', '/d', 'folder', 'now')")
        conn.execute("PRAGMA user_version = 5")
    store = RunStore(path)
    assert store.get_dataset(1)["feedback"] == []
    store.set_feedback(1, "/d/a.png", "good")
    assert store.get_dataset(1)["feedback"][0]["verdict"] == "good"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7


def test_the_reopened_dataset_trains_on_images_marked_good_and_tests_those_marked_defective(store):
    dataset_id = register_dataset(store, load_mvtec(DEMO), "mvtec", "nuts")
    store.set_feedback(dataset_id, FALSE_ALARM, "good")
    store.set_feedback(dataset_id, MISSED, "good")        # it was filed as defective, but is not
    store.set_feedback(dataset_id, TRAINING, "defective")  # a defect filed among the good training images
    samples = {str(s.path): s for s in open_dataset(store.get_dataset(dataset_id)).samples}
    for path in (FALSE_ALARM, MISSED):
        assert (samples[path].split, samples[path].label, samples[path].defect) == ("train", 0, "good")
    assert samples[MISSED].mask_path is None
    assert (samples[TRAINING].split, samples[TRAINING].label, samples[TRAINING].defect) == ("test", 1,
                                                                                           MARKED_DEFECTIVE)


def test_the_next_fit_after_mark_as_good_trains_on_that_image(store):
    dataset = load_mvtec(DEMO)                            # as the CLI loads it: the fit reads the feedback itself
    dataset_id = register_dataset(store, dataset, "mvtec", "nuts")
    store.set_feedback(dataset_id, FALSE_ALARM, "good", run_id=1)
    run_id = train_run(store, dataset_id, dataset, "patchcore", FAST)
    card = store.get_run(run_id)["model_card"]
    assert card["n_images"] == 28 + 1 and card["marked_good_by_user"] == 1
    scored = store.run_scores(run_id)
    assert FALSE_ALARM not in set(scored.query("split == 'test'")["path"]) and len(scored) == 22

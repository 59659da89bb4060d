"""Dirty training sets: the audit ranks defects filed as good at the top, and the tolerant fit drops them."""
import numpy as np
import pytest

from core.audit import audit, outlier_fence, fit_tolerant
from core.detectors import create_detector

FIXED = {"resize": 128, "coreset_ratio": 0.1, "score_border": 0, "calibration_fraction": 0}


@pytest.fixture(scope="module")
def dirty(demo):
    """The demo's 28 good training images with 3 of its defective test images filed among them."""
    good = [demo[i] for i in range(len(demo)) if demo.samples[i].split == "train"]
    defects = [demo[i] for i in range(len(demo)) if demo.samples[i].label == 1][::6][:3]
    images = good[:10] + defects[:1] + good[10:20] + defects[1:2] + good[20:] + defects[2:]
    planted = [10, 21, 30]
    return images, planted


def test_the_fence_is_tukeys_outlier_one():
    scores = np.arange(1.0, 9.0)                 # Q1 2.75, Q3 6.25: fence 6.25 + 1.5 * 3.5
    assert outlier_fence(scores) == pytest.approx(11.5)


def test_audit_ranks_planted_defects_first_and_the_tolerant_fit_drops_them(dirty):
    images, planted = dirty
    det = create_detector("patchcore", **FIXED).fit(images)
    found = audit(det, images)
    assert sorted(found.ranking[:3].tolist()) == planted
    assert set(found.maps) >= set(planted) and found.maps[planted[0]].shape == det.frame()
    # Each score is that of a model fitted without the image: far above the fitted model's own scores.
    assert np.all(found.scores > det.score_maps(images)[0])
    tolerant, again = fit_tolerant(create_detector("patchcore", **FIXED), images)
    dropped = tolerant.fit_info_["audit"]["dropped"]
    assert set(planted) <= set(dropped) and len(dropped) <= 6
    assert tolerant.fit_info_["n_images"] == len(images) - len(dropped)


def test_audit_refuses_what_it_cannot_do(dirty):
    images, _ = dirty
    with pytest.raises(ValueError, match="at least 10"):
        audit(create_detector("patchcore", **FIXED).fit(images[:5]), images[:5])
    with pytest.raises(ValueError, match="trains a network"):
        audit(create_detector("fastflow", resize=64, epochs=1).fit(images[:12]), images[:12])


def test_training_flags_or_drops_suspicious_images_and_honours_the_users_exclusions(tmp_path):
    import shutil

    from conftest import DEMO
    from core.audit import load_audit_maps
    from core.data import load_mvtec
    from core.pipeline import register_dataset, train_run
    from core.runs import RunStore
    root = tmp_path / "nuts"
    shutil.copytree(DEMO, root)
    planted = []
    for source in sorted((root / "test" / "colour").iterdir())[::6][:3]:
        planted.append(f"planted_{source.name}")
        shutil.move(source, root / "train" / "good" / planted[-1])
        (root / "ground_truth" / "colour" / f"{source.stem}.png").unlink(missing_ok=True)
    dataset = load_mvtec(root)
    store = RunStore()
    dataset_id = register_dataset(store, dataset, "mvtec")
    name = lambda path: path.split("/")[-1]  # noqa: E731

    # Drop: the planted defects are left out of the final fit, every image's audit score registered.
    run_id = train_run(store, dataset_id, dataset, "patchcore", FIXED, audit="drop")
    card = store.get_run(run_id)["model_card"]
    assert set(planted) <= set(card["audit"]["dropped_files"]) and card["n_images"] == 31 - len(card["audit"]["dropped_files"])
    audit_rows = store.run_scores(run_id).query("split == 'audit'")
    assert len(audit_rows) == 31 and set(audit_rows.query("defect == 'dropped'")["path"].map(name)) \
        == set(card["audit"]["dropped_files"])

    # Flag: the same list, nothing left out; the most suspicious images' maps are saved with the model.
    run_id = train_run(store, dataset_id, dataset, "patchcore", FIXED, audit="flag")
    run = store.get_run(run_id)
    assert run["model_card"]["n_images"] == 31 and run["model_card"]["audit"]["dropped_files"] == []
    suspicious = store.run_scores(run_id).query("split == 'audit' and defect == 'suspicious'")["path"].tolist()
    assert set(map(name, suspicious)) == set(card["audit"]["dropped_files"])
    maps = load_audit_maps(run["model_path"])
    assert set(suspicious) <= set(maps) and next(iter(maps.values())).shape == (128, 128)

    # The user leaves them out: every later fit goes without them until they are restored.
    store.set_excluded(dataset_id, suspicious)
    run_id = train_run(store, dataset_id, dataset, "patchcore", FIXED)
    card = store.get_run(run_id)["model_card"]
    assert card["n_images"] == 31 - len(suspicious) and card["left_out_by_user"] == len(suspicious)
    store.set_excluded(dataset_id, [str(p) for p in dataset.subset(split="train").paths])
    with pytest.raises(ValueError, match="every training image of this dataset was left out"):
        train_run(store, dataset_id, dataset, "patchcore", FIXED)
    with pytest.raises(ValueError, match="trains a network"):
        store.set_excluded(dataset_id, [])
        train_run(store, dataset_id, dataset, "fastflow", {"epochs": 1}, audit="drop")
    with pytest.raises(ValueError, match="audit must be one of"):
        train_run(store, dataset_id, dataset, "patchcore", FIXED, audit="yes")

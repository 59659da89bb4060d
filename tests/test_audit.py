"""Dirty training sets: the audit ranks defects filed as good at the top, and the tolerant fit drops them."""
import numpy as np
import pytest

from core.audit import audit, outlier_fence, fit_tolerant
from core.detectors import create_detector

FIXED = {"resize": 256, "coreset_ratio": 0.1, "score_border": 0, "calibration_fraction": 0}


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


def test_training_with_drop_suspicious_leaves_planted_defects_out_and_registers_the_audit(tmp_path):
    import shutil

    from conftest import DEMO
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
    run_id = train_run(store, register_dataset(store, dataset, "mvtec"), dataset, "patchcore", FIXED,
                       drop_suspicious=True)
    card = store.get_run(run_id)["model_card"]
    assert set(planted) <= set(card["audit"]["dropped_files"]) and card["n_images"] == 31 - len(card["audit"]["dropped_files"])
    audit_rows = store.run_scores(run_id).query("split == 'audit'")
    assert len(audit_rows) == 31 and set(audit_rows.query("defect == 'dropped'")["path"].map(lambda p: p.split("/")[-1])) \
        == set(card["audit"]["dropped_files"])
    with pytest.raises(ValueError, match="trains a network"):
        train_run(store, 1, dataset, "fastflow", {"epochs": 1}, drop_suspicious=True)

"""The calibration split every fit makes: held-out or cross-fitted good images, scored by a model that never
saw them, saved with the model, and the normal-only threshold the registry gets from them."""
import json

import numpy as np
import pytest

from core.detectors import create_detector, load_detector
from core.detectors.calibration import FOLDS, held_out_index
from core.pipeline import default_thresholds
from core.thresholds import normal_threshold


@pytest.fixture(scope="module")
def train_images(demo):
    return [demo[i] for i in range(len(demo)) if demo.samples[i].split == "train"]


def test_a_large_set_holds_out_a_share_the_model_never_sees(train_images, tmp_path):
    # 28 good images in four orientations: 112, so 10% is 11 held out.
    images = [np.ascontiguousarray(v) for im in train_images for v in (im, im[::-1], im[:, ::-1], im[::-1, ::-1])]
    det = create_detector("padim", resize=128).fit(images)
    cal = det.calibration_
    assert cal.method == "held_out" and len(cal.index) == 11
    assert det.fit_info_["n_images"] == 101 and det.fit_info_["calibration"] == {"method": "held_out", "n_images": 11}
    # The scores are the final model's own scores of those images, which it was not fitted on.
    assert np.allclose(cal.scores, det.score_maps([images[i] for i in cal.index])[0])
    assert cal.index == held_out_index(112, 0.1, 0).tolist()
    assert np.mean(cal.synthetic_scores[:, None] > cal.scores[None, :]) > 0.7   # pasted defects stand out
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m").calibration_
    assert again.index == cal.index and again.synthetic_kinds == cal.synthetic_kinds
    assert np.array_equal(again.scores, cal.scores) and np.array_equal(again.synthetic_scores, cal.synthetic_scores)
    # Every 2nd pixel of each 128 x 128 map: a sample of the good pixels' values, 64 x 64 per image.
    maps = det.score_maps([images[i] for i in cal.index])[1]
    assert cal.maps.shape == (11, 64, 64) and np.allclose(cal.maps, maps[:, ::2, ::2], rtol=1e-3)
    assert np.array_equal(again.maps, cal.maps)


def test_a_small_set_is_cross_fitted_and_every_image_scored_by_a_model_without_it(train_images):
    det = create_detector("patchcore", resize=128, coreset_ratio=0.1, score_border=0).fit(train_images)
    cal = det.calibration_
    assert cal.method == "cross_fit" and sorted(cal.index) == list(range(len(train_images)))
    assert det.fit_info_["n_images"] == len(train_images)                  # the final model keeps every image
    assert det.fit_info_["calibration"] == {"method": "cross_fit", "n_images": 28, "folds": FOLDS}
    # The final model has every image's patches in its bank; the fold models did not: their scores are higher.
    own = det.score_maps([train_images[i] for i in cal.index])[0]
    assert np.all(cal.scores > own)


def test_no_calibration_where_it_is_switched_off_too_small_or_too_dear(train_images):
    assert create_detector("padim", resize=128, calibration_fraction=0).fit(train_images).calibration_ is None
    assert create_detector("padim", resize=128).fit(train_images[:9]).calibration_ is None
    # FastFlow trains a network: a small set is not refitted five times.
    det = create_detector("fastflow", resize=128, epochs=1).fit(train_images)
    assert det.calibration_ is None and "calibration" not in det.fit_info_
    for bad in (0.5, -0.1, float("nan"), "lots", True):
        with pytest.raises(ValueError, match="calibration_fraction"):
            create_detector("padim", calibration_fraction=bad).fit(train_images)


def test_a_model_saved_before_calibration_loads_without_it(train_images, tmp_path):
    det = create_detector("padim", resize=64).fit(train_images)
    det.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["calibration"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    tensors = {k: v for k, v in load_file(tmp_path / "m" / "fitted.safetensors").items() if not k.startswith("calibration.")}
    save_file(tensors, tmp_path / "m" / "fitted.safetensors")
    old = load_detector(tmp_path / "m")
    assert old.calibration_ is None
    assert np.allclose(old.score_maps(train_images[:2])[0], det.score_maps(train_images[:2])[0])


def test_a_run_without_labelled_defects_gets_its_threshold_from_good_images(train_images):
    cal = create_detector("padim", resize=64).fit(train_images).calibration_
    chosen = default_thresholds(None, cal)
    # 28 images cannot show 1% (1 in 29 at best), so the default is the lowest rate they can: the top score.
    # Defect regions start where one in a thousand of the good pixels reach.
    pixel = np.quantile(cal.maps.astype(np.float32), 0.999)
    assert chosen == {"image": normal_threshold(cal.scores, 1 / 29).threshold, "pixel": pytest.approx(pixel),
                      "preset": "false_reject_rate"}
    assert np.mean(cal.maps >= chosen["pixel"]) == pytest.approx(0.001, abs=2e-4)
    assert chosen["image"] == cal.scores.max()
    assert default_thresholds(None, None) == {"image": None, "pixel": None, "preset": None}

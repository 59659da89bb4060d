"""A run's saved test results: written by training, read back unchanged, recomputed when missing."""
import shutil

import numpy as np
import pytest

from core.data import read_image
from core.detectors import load_detector
from core.pipeline import run_results
from core.results import RESULTS_FILE, colour_scale, load_results


def test_training_saves_maps_and_masks_next_to_the_model(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    results = run_results(store, run_id)
    scores = store.run_scores(run_id)
    scores = scores[scores["split"] == "test"]                       # the rest are the calibration's
    assert list(results.paths) == scores["path"].tolist()
    np.testing.assert_allclose(results.scores, scores["score"], rtol=1e-6)
    assert results.maps.dtype == np.float16 and results.maps.shape == (23, 256, 256)   # the whole image, no crop
    assert results.has_mask.all()                                   # the demo set has every mask
    assert not results.masks[results.labels == 0].any() and results.masks[results.labels == 1].any()
    assert results.frame(0).shape == (256, 256, 3)
    with pytest.raises(ValueError):
        results.maps[0, 0, 0] = 1                                    # shared between sessions: read-only


def test_saved_maps_are_the_detector_maps(workspace):
    store, run_id = workspace["store"], workspace["run_id"]
    results = run_results(store, run_id)
    scores, maps = load_detector(store.get_run(run_id)["model_path"]).score_maps([read_image(results.paths[5])])
    np.testing.assert_allclose(results.map(5), maps[0], rtol=2e-3, atol=2e-2)   # float16 storage
    assert results.scores[5] == pytest.approx(scores[0], rel=1e-5)


def test_missing_results_are_recomputed_once(workspace, tmp_path):
    store, run_id = workspace["store"], workspace["run_id"]
    original = store.get_run(run_id)["model_path"]
    copy = tmp_path / "model"
    shutil.copytree(original, copy)
    (copy / RESULTS_FILE).unlink()
    with store._write() as conn:
        conn.execute("UPDATE runs SET model_path = ? WHERE id = ?", (str(copy), run_id))
    stages = []
    results = run_results(store, run_id, progress=lambda stage, done, total: stages.append(stage))
    assert "score" in stages and (copy / RESULTS_FILE).is_file()
    np.testing.assert_allclose(results.scores, load_results(original).scores, rtol=1e-5)


def test_colour_scale_is_per_run_and_keeps_normal_sets_calm():
    rng = np.random.default_rng(0)
    normal = rng.random((10, 32, 32)).astype(np.float32)
    vmin, vmax = colour_scale(normal, np.zeros(10))
    assert vmax >= vmin + 2 * (np.quantile(normal, 0.999) - vmin) * 0.99   # normal peaks sit mid-scale
    with_defects = np.concatenate([normal, normal[:2] + 10])
    assert colour_scale(with_defects, np.r_[np.zeros(10), np.ones(2)])[1] > 10

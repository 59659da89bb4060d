"""PatchCore's parts against slow, obviously correct references, and its numbers on real data."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from core import metrics
from core.detectors import patchcore as patchcore_module
from core.detectors import coreset
from core.detectors.coreset import StreamingCoreset, greedy_coreset, project
from core.detectors import create_detector
from core.detectors.ops import upsample_blur
from core.pipeline import evaluate

from conftest import shared_category


def naive_greedy(z: np.ndarray, k: int, start: int) -> list[int]:
    """Textbook farthest-point selection with a full distance update every step."""
    selected, min_dist = [start], np.linalg.norm(z - z[start], axis=1)
    for _ in range(k - 1):
        selected.append(int(np.argmax(min_dist)))
        min_dist = np.minimum(min_dist, np.linalg.norm(z - z[selected[-1]], axis=1))
    return selected


@pytest.mark.parametrize("pool", [64, 4096])
def test_batched_greedy_coreset_selects_like_the_textbook_algorithm(rng, monkeypatch, pool):
    # Clustered points, like real patch features; a small pool makes many passes over them, a large one few.
    monkeypatch.setattr(coreset, "POOL", pool)
    centres = rng.normal(size=(20, 16)) * 10
    points = torch.from_numpy((centres[rng.integers(20, size=3000)] + rng.normal(size=(3000, 16))).astype(np.float32))
    selected, radii = greedy_coreset(points, 150, projection_dim=8, seed=3)
    z = project(points, 8, seed=3)
    assert selected.tolist() == naive_greedy(z.astype(np.float64), 150, int(selected[0]))
    assert np.all(np.diff(radii) <= 1e-6), "coverage radius never rises"
    nearest = np.min(np.linalg.norm(z[:, None] - z[selected][None], axis=2), axis=1)
    assert radii[-1] == pytest.approx(nearest.max(), rel=1e-5)


def test_coreset_of_everything_covers_everything(rng):
    points = torch.from_numpy(rng.normal(size=(50, 4)).astype(np.float32))
    selected, radii = greedy_coreset(points, 50, projection_dim=None)
    assert sorted(selected.tolist()) == list(range(50)) and radii[-1] == 0


def test_streamed_coreset_keeps_its_share_per_chunk_and_bounds_the_coverage(rng):
    centres = rng.normal(size=(30, 16)) * 10
    points = torch.from_numpy((centres[rng.integers(30, size=5000)] + rng.normal(size=(5000, 16))).astype(np.float32))
    stream = StreamingCoreset(len(points), 200, projection_dim=None, chunk_rows=1200)
    for start in range(0, 5000, 700):        # batches do not line up with chunks
        stream.add(points[start:start + 700])
    bank, bound = stream.finish()
    assert bank.shape == (200, 16) and np.all(np.diff(bound) <= 1e-6)
    # Every point is within the reported radius of the bank, and the plain greedy does little better.
    radius = np.linalg.norm(points.numpy()[:, None] - bank.numpy()[None], axis=2).min(1).max()
    assert radius <= bound[-1] + 1e-4
    plain = greedy_coreset(points, 200, projection_dim=None)[1][-1]
    assert plain > 0.8 * radius


def test_ivf_search_gives_the_exact_image_scores_and_survives_save_load(demo, tmp_path):
    from core.detectors import load_detector
    train, test = demo.subset(split="train"), demo.subset(split="test")
    # One probed cell of many: most patches get a farther neighbour than the true one. (Eq. 7 is left out: it
    # weighs by the bank's own neighbours, which the index finds as well.)
    params = dict(resize=192, coreset_ratio=0.5, nprobe=1, seed=1, score_border=8, reweight=False,
                  calibration_fraction=0)
    exact = create_detector("patchcore", search="exact", **params).fit(train)
    ivf = create_detector("patchcore", search="ivf", **params).fit(train)
    assert ivf.model_card()["memory_bank"]["search"].startswith("ivf")
    (s_exact, m_exact), (s_ivf, m_ivf) = exact.score_maps(test), ivf.score_maps(test)
    assert np.mean(np.abs(m_ivf - m_exact) > 1e-3) > 0.05      # the maps show the index's approximation...
    np.testing.assert_allclose(s_ivf, s_exact, rtol=1e-5)     # ...the image scores do not
    loaded = load_detector(ivf.save(tmp_path / "ivf"))
    np.testing.assert_array_equal(loaded.score_maps(test)[0], s_ivf)


def test_upsample_blur_equals_bilinear_then_gaussian(rng):
    grid = torch.from_numpy(rng.random((3, 28, 28)).astype(np.float32))
    reference = F.interpolate(grid[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0].double()
    reference = np.stack([ndi.gaussian_filter(m, 4, mode="mirror", truncate=4.0) for m in reference.numpy()])
    np.testing.assert_allclose(upsample_blur(grid, 224, 4.0).numpy(), reference, atol=1e-5)


def test_eq7_reweighting_only_shrinks_scores(demo):
    train, test = demo.subset(split="train"), demo.subset(split="test")
    fixed = dict(resize=256, coreset_ratio=0.05, score_border=0, calibration_fraction=0)
    plain = create_detector("patchcore", reweight=False, **fixed).fit(train)
    weighted = create_detector("patchcore", reweight=True, **fixed).fit(train)
    s_plain, m_plain = plain.score_maps(test)
    s_weighted, m_weighted = weighted.score_maps(test)
    np.testing.assert_array_equal(m_plain, m_weighted)         # the map is never reweighted
    assert np.all(s_weighted <= s_plain) and np.all(s_weighted > 0)
    # Upsampling and blurring average patch scores, so the map never exceeds the worst patch's score.
    assert np.all(m_plain.reshape(len(test), -1).max(1) <= s_plain + 1e-4)


def test_patchcore_meets_the_paper_bar_on_bottle():
    from core.data import load_mvtec
    bottle = load_mvtec(shared_category("bottle"))
    # 256 px and a 2% bank keep the test near half a minute; the defaults (auto: 384 px and a 10% bank here)
    # are measured by `core bench`.
    det = create_detector("patchcore", resize=256, coreset_ratio=0.02, score_border=0,
                          calibration_fraction=0).fit(bottle.subset(split="train"))
    result = evaluate(det, bottle.subset(split="test")).metrics
    assert result["image_auroc"] >= 0.995
    assert result["pixel_auroc"] >= 0.975
    assert result["aupro"] >= 0.90


def test_nprobe_auto_takes_the_fewest_cells_that_keep_the_neighbours(demo, tmp_path):
    from core.detectors import load_detector
    train = demo.subset(split="train")
    det = create_detector("patchcore", search="ivf", resize=192, coreset_ratio=0.5, seed=1, score_border=0,
                          calibration_fraction=0).fit(train)
    choice = det.nprobe_choice_
    shares = [row["share_over_1pct"] for row in choice["candidates"]]
    # Candidates are tried from the fewest cells up; it stops at the first within tolerance, no earlier.
    assert [row["nprobe"] for row in choice["candidates"]] == list(patchcore_module.AUTO_NPROBE[:len(shares)])
    assert shares[-1] <= patchcore_module.NPROBE_TOLERANCE and all(s > patchcore_module.NPROBE_TOLERANCE
                                                                  for s in shares[:-1])
    assert det._index.nprobe == det.nprobe_ == choice["candidates"][-1]["nprobe"]
    assert f"nprobe {det.nprobe_}" in det.model_card()["memory_bank"]["search"]
    loaded = load_detector(det.save(tmp_path / "m"))
    assert loaded._index.nprobe == det.nprobe_
    with pytest.raises(ValueError, match="nprobe"):
        create_detector("patchcore", nprobe=0).check_params()

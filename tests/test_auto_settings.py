"""Settings chosen from normal images alone: synthetic defects, the selection rule, and PatchCore's auto preset."""
import numpy as np
import pytest

from core.bench import AugmentedCopies
from core.detectors import create_detector, load_detector
from core.detectors import auto_settings
from core.synthetic import GENERATORS, perlin_noise, synthetic_defect


@pytest.fixture(scope="module")
def textured():
    rng = np.random.default_rng(0)
    base = rng.integers(90, 160, (96, 128, 3), dtype=np.uint8)
    return base


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_each_synthetic_defect_changes_its_mask_and_nothing_else(textured, kind):
    out, mask, name = synthetic_defect(textured, np.random.default_rng(5), kind)
    assert name == kind and out.shape == textured.shape and out.dtype == np.uint8
    assert mask.shape == textured.shape[:2] and 0 < mask.mean() < 0.2
    changed = np.abs(out.astype(int) - textured).max(axis=2) > 0
    assert not (changed & ~mask).any(), "pixels outside the mask are untouched"
    assert (changed & mask).sum() >= 0.2 * mask.sum()


def test_synthetic_defects_are_deterministic_with_a_seed(textured):
    a = synthetic_defect(textured, np.random.default_rng(3))
    b = synthetic_defect(textured, np.random.default_rng(3))
    c = synthetic_defect(textured, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="at least 8 x 8"):
        synthetic_defect(textured[:4], np.random.default_rng(0))


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin_noise((64, 96), (2, 3), np.random.default_rng(0))
    assert noise.shape == (64, 96) and np.abs(noise).max() <= 1.5 and noise.std() > 0.05
    # Smooth: neighbouring values differ far less than the spread of the field.
    assert np.abs(np.diff(noise, axis=1)).max() < 0.2 * np.ptp(noise)


def test_separation_on_a_hand_computed_case():
    labels = np.array([0, 0, 1, 1])
    scores = np.zeros((4, 2, 2))
    scores[0, 0, 0], scores[1, 1, 1] = 0.3, 0.5       # good images: worst cells 0.3 and 0.5
    scores[2, 0, 1], scores[3, 1, 0] = 0.9, 0.4       # defects: 0.9 (its cell), 0.4 (its cell)
    coverage = np.zeros((4, 2, 2))
    coverage[2, 0, 1] = coverage[3, 1, 0] = 1.0
    result = auto_settings.separation(labels, scores.reshape(4, -1).max(axis=1), scores, coverage)
    # Image AUROC: pairs (0.9 > 0.3, 0.9 > 0.5, 0.4 > 0.3, 0.4 < 0.5) -> 3/4.
    assert result["image_auroc"] == 0.75
    # Patch AP: ranking 0.9 (pos), 0.5 (neg), 0.4 (pos), 0.3 (neg), zeros: precision 1 at recall 1/2, 2/3 at 1.
    assert result["patch_ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-4)
    assert result["separation"] == pytest.approx((0.75 + 0.8333) / 2, abs=1e-4)


def test_the_cheapest_candidate_within_the_tolerance_wins():
    rows = [{"bank": 1000, "separation": 0.90}, {"bank": 2500, "separation": 0.948},
            {"bank": 5000, "separation": 0.95}, {"bank": 10000, "separation": 0.951}]
    assert auto_settings.cheapest_within(rows)["bank"] == 2500
    assert auto_settings.cheapest_within(rows, tolerance=0.0)["bank"] == 10000
    # Paired bootstrap values: the 1000-patch bank trails the best by 0.051 on average, give or take 0.1.
    noisy = [dict(r, bootstrap={"separation": [r["separation"] + d for d in (0.1, -0.1, 0.0)]}) for r in rows]
    noisy[0]["bootstrap"] = {"separation": [0.9 + d for d in (0.2, -0.2, 0.0)]}
    assert auto_settings.cheapest_within(noisy)["bank"] == 1000


def test_held_out_images_are_never_fitted_on(demo):
    train = demo.subset(split="train")
    held = auto_settings.hold_out(train, seed=0)
    assert not set(held.held_out_index) & set(held.train_index)
    assert len(held.held_out_index) + len(held.train_index) == len(train)
    n = len(held.held_out_index)
    assert held.labels.tolist() == [0] * n + [1] * (auto_settings.DEFECTS_PER_IMAGE * n)
    assert all(m.any() for m in held.masks[n:]) and not any(m.any() for m in held.masks[:n])


def test_auto_preset_chooses_differently_for_25_and_600_images(demo):
    originals = [demo.subset(split="train")[i] for i in range(25)]
    small = create_detector("patchcore", resize=128)._auto_settings(originals, [im.shape[:2] for im in originals],
                                                                   lambda *a: None)
    many = AugmentedCopies(originals, 600)
    large = create_detector("patchcore", resize=128)._auto_settings(many, [im.shape[:2] for im in originals] * 24,
                                                                   lambda *a: None)
    for chosen in (small, large):
        assert {"coreset_ratio", "score_border", "why", "candidates"} <= set(chosen)
        assert "long_side" not in chosen          # resize was set, so it is not chosen
    assert small["n_held_out"] == 5 and large["n_held_out"] == auto_settings.HELD_OUT_RANGE[1]
    # 25 images have few patches: the bank that covers them is a far larger share of theirs than for 600.
    assert small["coreset_ratio"] > large["coreset_ratio"]
    assert max(r["bank"] for r in small["candidates"]) < max(r["bank"] for r in large["candidates"])


def test_auto_fit_records_its_choice_and_a_saved_model_keeps_it(demo, tmp_path):
    train, test = demo.subset(split="train"), demo.subset(split="test")
    det = create_detector("patchcore", resize=128).fit(train)
    chosen = det.fit_info_["auto_settings"]
    assert det.score_border_px_ == chosen["score_border"]
    assert len(det.memory_bank_) == max(round(chosen["coreset_ratio"] * det.n_train_patches_), det.min_bank) or \
        len(det.memory_bank_) == det.n_train_patches_
    assert "held-out good images" in chosen["why"]
    assert det.model_card()["auto_settings"]["why"] == chosen["why"]
    again = load_detector(det.save(tmp_path / "m"))
    assert again.score_border_px_ == det.score_border_px_
    np.testing.assert_array_equal(again.predict(test).scores, det.predict(test).scores)


def test_a_set_too_small_to_hold_out_keeps_the_defaults(demo):
    det = create_detector("patchcore", resize=128).fit(demo.subset(split="train")[:6])
    chosen = det.fit_info_["auto_settings"]
    assert chosen["score_border"] == 0 and "too few to hold any out" in chosen["why"]


def test_score_border_leaves_the_edge_out_of_the_image_score_but_not_out_of_the_map(demo):
    train = demo.subset(split="train")[:8]
    # Exact search: with IVF each model re-checks its own worst patches exactly, so their maps differ there.
    whole = create_detector("patchcore", resize=128, coreset_ratio=0.2, score_border=0, search="exact").fit(train)
    inner = create_detector("patchcore", resize=128, coreset_ratio=0.2, score_border=16, search="exact").fit(train)
    image = np.array(demo.subset(split="test", label=0)[0])
    image[:, :image.shape[1] // 25] = (255, 0, 255)     # a defect along the left edge only
    s_whole, m_whole = whole.score_maps([image])
    s_inner, m_inner = inner.score_maps([image])
    np.testing.assert_array_equal(m_whole, m_inner)
    assert s_inner[0] < 0.8 * s_whole[0]
    with pytest.raises(ValueError, match="score_border"):
        create_detector("patchcore", score_border=-8).fit(train)


def test_the_frame_kept_is_the_smallest_that_keeps_the_images_detail():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:640, 0:640]
    smooth = [np.repeat(((np.sin(x / 90 + p) + np.cos(y / 70)) * 60 + 128)[..., None], 3, 2).astype(np.uint8)
              for p in rng.uniform(0, 6, 3)]
    # One-pixel tracks every 7 px (a board's traces): any shrinking blurs them.
    tracks = [np.repeat(np.where(((x + s) % 7 == 0) | ((y + s) % 11 == 0), 255, 0)[..., None], 3, 2).astype(np.uint8)
              for s in range(3)]
    frames = [(384, 384), (512, 512), (640, 640)]
    frame, losses = auto_settings.detail_keeping_frame(smooth, frames, seed=0)
    assert frame == (384, 384) and losses == {"384x384": pytest.approx(0, abs=1e-3)}   # stops at the first that keeps
    frame, losses = auto_settings.detail_keeping_frame(tracks, frames, seed=0)
    assert frame == (640, 640) and losses["384x384"] > 0.1 and losses["512x512"] > 0.05 and losses["640x640"] == 0
    assert auto_settings.detail_lost(tracks, (640, 640)) == 0.0

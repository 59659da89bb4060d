"""The reconstruction family (ae, dae, vae, ganomaly): SSIM, map -> score, seeding, cancelling, GANomaly's map."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from core import Cancelled
from core.detectors import create_detector
from core.detectors._reconstruction import score_from_map, ssim, ssim_map

FAMILY = ["ae", "dae", "vae", "ganomaly"]
TINY = {"resize": 16, "epochs": 2, "batch_size": 4, "base_channels": 4, "max_channels": 8, "latent_dim": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are tiny: thread start-up and spinning would cost more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(1, 24, 24, 3))
    return [np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)[0] for _ in range(9)]


# ------------------------------------------------------------------------------------------------ SSIM

def test_ssim_of_identical_images_is_one(rng):
    a = torch.from_numpy(rng.random((2, 3, 32, 32)))
    np.testing.assert_allclose(ssim(a, a).numpy(), 1.0, atol=1e-12)


def test_ssim_decreases_with_noise(rng):
    a = torch.from_numpy(rng.random((1, 3, 48, 48)))
    noise = torch.from_numpy(rng.standard_normal((1, 3, 48, 48)))
    values = [ssim(a, (a + s * noise).clamp(0, 1)).item() for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert values[0] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in zip(values, values[1:]))


def test_ssim_matches_skimage_away_from_borders(rng):
    a = rng.random((40, 36, 3))
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1)
    expected = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    to_t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None]  # noqa: E731
    ours = ssim_map(to_t(a), to_t(b))[0].numpy()
    # skimage averages the map after cropping (win_size - 1) // 2 = 5 pixels at every border.
    assert ours[5:-5, 5:-5].mean() == pytest.approx(expected, abs=1e-6)


def test_ssim_is_differentiable(rng):
    a = torch.from_numpy(rng.random((1, 3, 20, 20)))
    b = torch.from_numpy(rng.random((1, 3, 20, 20))).requires_grad_()
    (1 - ssim(a, b)).sum().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_score_from_map_max_and_top_k_mean():
    maps = torch.arange(200, dtype=torch.float32).reshape(2, 10, 10)
    np.testing.assert_array_equal(score_from_map(maps, 0).numpy(), [99, 199])
    np.testing.assert_array_equal(score_from_map(maps, 1.0).numpy(), maps.flatten(1).mean(1).numpy())
    np.testing.assert_allclose(score_from_map(maps, 0.05).numpy(), [97, 197])  # mean of the top 5 of 100


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("name", FAMILY)
def test_cancelled_training_raises_and_leaves_detector_unfitted(name, images):
    det = create_detector(name, **TINY)
    calls = []

    def progress(stage, done, total):
        if stage == "train":
            calls.append((done, total))
            raise Cancelled()

    with pytest.raises(Cancelled):
        det.fit(images, progress)
    assert calls == [(1, TINY["epochs"])], "progress is reported once per epoch"
    assert not det.is_fitted() and not hasattr(det, "net_")


@pytest.mark.parametrize("name", FAMILY)
def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone(name, images):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = create_detector(name, seed=7, **TINY).fit(images)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected_next.numpy())
    b = create_detector(name, seed=7, **TINY).fit(images)
    c = create_detector(name, seed=8, **TINY).fit(images)
    sa, sb, sc = (d._fitted_tensors() for d in (a, b, c))
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    np.testing.assert_array_equal(a.score_maps(images)[0], b.score_maps(images)[0])


@pytest.mark.parametrize("name", FAMILY)
def test_card_reports_architecture_and_training(name, images):
    card = create_detector(name, **TINY).fit(images).model_card()
    assert card["family"] == "reconstruction"
    assert card["architecture"]["input_size"] == 16 and card["architecture"]["parameters"] > 0
    assert card["training"]["epochs"] == TINY["epochs"]
    assert np.isfinite(card["training"]["final_loss"]["loss"])
    assert isinstance(card["anomaly_map"], str)


def test_input_size_must_be_a_power_of_two(images):
    with pytest.raises(ValueError, match="power of two"):
        create_detector("ae", **{**TINY, "resize": 24}).fit(images)


def test_denoising_ae_needs_some_corruption(images):
    with pytest.raises(ValueError, match="noise_std"):
        create_detector("dae", **TINY, noise_std=0.0, mask_ratio=0.0).fit(images)


def test_dae_corruption_changes_inputs_and_stays_in_range():
    det = create_detector("dae", noise_std=0.1, mask_ratio=0.5, mask_patch=4)
    x = torch.zeros(2, 3, 16, 16) + 0.3
    torch.manual_seed(0)
    y = det._corrupt(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert (y == 0).float().mean() > 0.2, "about half the 4x4 squares are masked to mid-grey"


def test_vae_scores_are_deterministic(images):
    det = create_detector("vae", **TINY).fit(images)
    np.testing.assert_array_equal(det.score_maps(images)[0], det.score_maps(images)[0])


@pytest.mark.parametrize("latent_score", ["paper", "standardized"])
def test_ganomaly_score_is_the_latent_distance_and_map_is_scaled(images, latent_score):
    det = create_detector("ganomaly", **TINY, latent_score=latent_score).fit(images)
    x = det.preprocess.images_to_tensor(images)
    scores, maps = det.score_tensor(x)
    with torch.no_grad():
        _, z, z2 = det.net_.generator(x)
    diff = (z - z2).flatten(1)
    if latent_score == "standardized":  # centred and scaled per dimension by the training differences
        diff = (diff - diff.mean(0)) / diff.std(0)
        np.testing.assert_allclose(scores.mean(), (len(images) - 1) / len(images), rtol=1e-4)  # unbiased std
    np.testing.assert_allclose(scores, diff.pow(2).mean(1).numpy(), rtol=1e-4)
    assert maps.shape == (len(images), 16, 16) and np.isfinite(maps).all()
    # One fitted constant puts the training maps' mean peak on the training scores' mean.
    assert maps.reshape(len(images), -1).max(1).mean() == pytest.approx(scores.mean(), rel=1e-4)
    assert "discriminator" not in " ".join(det._fitted_tensors()), "only the generator is saved"
    assert f"latent_score={latent_score!r}" in det.model_card()["anomaly_map"]   # the card names it, no braces

"""PaDiM's maths against numpy references."""
import numpy as np
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from core.detectors import create_detector
from core.detectors.padim import mahalanobis


def test_mahalanobis_matches_scipy(rng):
    n, p, d = 3, 5, 4
    emb = rng.normal(size=(n, p, d))
    mean = rng.normal(size=(p, d))
    a = rng.normal(size=(p, d, d))
    precision = np.linalg.inv(a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d))
    got = mahalanobis(torch.from_numpy(emb), torch.from_numpy(mean), torch.from_numpy(precision)).numpy()
    want = [[scipy_mahalanobis(emb[i, j], mean[j], precision[j]) for j in range(p)] for i in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_fitted_gaussians_match_numpy_mean_and_covariance(demo):
    train = demo.subset(split="train", label=0)
    images = [train[i] for i in range(6)]
    det = create_detector("padim", n_features=8, resize=96, crop=64, seed=3).fit(images)
    with torch.no_grad():
        emb = det.embed(det.preprocess.images_to_tensor(images)).double().flatten(2).transpose(1, 2).numpy()
    assert det.channel_idx_.shape == (8,) and det.mean_.shape == (emb.shape[1], 8)
    np.testing.assert_allclose(det.mean_.numpy(), emb.mean(0), rtol=1e-5, atol=1e-5)
    for pos in (0, emb.shape[1] // 2, emb.shape[1] - 1):
        cov = np.cov(emb[:, pos].T) + 0.01 * np.eye(8)
        np.testing.assert_allclose(det.precision_[pos].numpy() @ cov, np.eye(8), atol=1e-3)
    # The channel subset depends on the seed only.
    again = create_detector("padim", n_features=8, resize=96, crop=64, seed=3).fit(images[:2])
    assert torch.equal(again.channel_idx_, det.channel_idx_)


def test_precision_is_saved_as_one_triangle_and_full_matrices_still_load(demo, tmp_path):
    from safetensors.torch import load_file, save_file
    from core.detectors import load_detector
    images = [demo.subset(split="train")[i] for i in range(4)]
    det = create_detector("padim", n_features=8, resize=64, seed=1).fit(images)
    assert torch.equal(det.precision_, det.precision_.transpose(1, 2))
    folder = det.save(tmp_path / "model")
    tensors = load_file(folder / "fitted.safetensors")
    assert "precision" not in tensors and tensors["precision_lower"].shape[-1] == 8 * 9 // 2
    loaded = load_detector(folder)
    assert torch.equal(loaded.precision_, det.precision_)
    # A model written with the full matrices (before this change) scores the same.
    tensors["precision"] = det.precision_
    del tensors["precision_lower"]
    save_file(tensors, folder / "fitted.safetensors")
    old = load_detector(folder)
    test = demo.subset(split="test")[:2]
    np.testing.assert_array_equal(old.score_maps(test)[0], det.score_maps(test)[0])

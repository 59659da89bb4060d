"""EfficientAD's pieces: network shapes, the hard feature loss, penalty images and colour jitter."""
import numpy as np
import pytest
import torch

from core.detectors.efficientad import (AutoEncoder, _quantile, colour_jitter, hard_feature_loss, pdn_small,
                                        penalty_pool, sample_penalty)


def test_pdn_and_autoencoder_output_the_teacher_grid():
    x = torch.zeros(1, 3, 256, 256)
    assert pdn_small(10, width=0.0625)(x).shape == (1, 10, 64, 64)       # the paper's padded PDN: stride 4
    assert pdn_small(10, width=0.0625, stride=8)(x).shape == (1, 10, 32, 32)
    assert AutoEncoder(6, grid=64, width=16)(x).shape == (1, 6, 64, 64)
    assert AutoEncoder(6, grid=32, width=16)(torch.zeros(2, 3, 128, 128)).shape == (2, 6, 32, 32)


def test_hard_feature_loss_is_the_mean_above_the_quantile(rng):
    t, s = torch.from_numpy(rng.normal(size=(2, 4, 25, 20))), torch.from_numpy(rng.normal(size=(2, 4, 25, 20)))
    d = ((t - s) ** 2).numpy().ravel()
    want = d[d >= np.quantile(d, 0.99)].mean()
    assert float(hard_feature_loss(t, s, 0.99)) == pytest.approx(want, rel=1e-12)
    assert float(hard_feature_loss(t, s, 0.5)) == pytest.approx(d[d >= np.median(d)].mean(), rel=1e-12)


def test_quantile_matches_numpy(rng):
    v = torch.from_numpy(rng.normal(size=1001))
    got = _quantile(v, torch.tensor([0.9, 0.995], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, np.quantile(v.numpy(), [0.9, 0.995]), rtol=1e-12)


def test_penalty_images_are_bundled_natural_images():
    pool = penalty_pool()
    assert len(pool) >= 5 and all(p.shape[0] == 3 and 0 <= float(p.min()) and float(p.max()) <= 1 for p in pool)
    a = sample_penalty(4, 32, torch.Generator().manual_seed(0))
    b = sample_penalty(4, 32, torch.Generator().manual_seed(0))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and float(a.std()) > 0.01


def test_colour_jitter_stays_in_range_and_is_seeded():
    x = torch.rand(6, 3, 8, 8)
    a = colour_jitter(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, colour_jitter(x, torch.Generator().manual_seed(1)))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert 0 < float((a - x).abs().mean()) < 0.2


def test_training_is_seeded_and_cancellable(demo):
    from core import Cancelled
    from core.detectors import create_detector

    train = demo.subset(split="train", label=0)
    images = [train[i] for i in range(6)]
    params = dict(resize=64, steps=4, student_width=0.0625, ae_width=16, penalty_size=32, seed=2)
    a = create_detector("efficientad", **params).fit(images)
    b = create_detector("efficientad", **params).fit(images)
    assert a.history_ == b.history_ and torch.equal(a.quantiles_, b.quantiles_)
    assert a.model_card()["teacher"]["kind"].startswith("frozen pretrained")
    seen = []

    def stop(stage, done, total):
        if stage == "step":
            seen.append(done)
            raise Cancelled()
    with pytest.raises(Cancelled):
        create_detector("efficientad", **params).fit(images, stop)
    assert seen == [1]

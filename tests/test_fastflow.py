"""FastFlow's coupling steps: exact inverses and log-determinants that match autograd's Jacobian."""
import math

import numpy as np
import torch
from torch.autograd.functional import jacobian

from core.detectors.fastflow import AffineCouplingStep, Flow2d, flow_nll, split_validation


def _randomised(module, seed=0):
    """Perturb every parameter so the test does not pass only at the identity-like initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def test_flow_is_invertible_and_log_det_matches_jacobian():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    flow = _randomised(Flow2d(5, steps=4, hidden_ratio=1.0, clamp=2.0, conv3x3_only=False, generator=gen)).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    z, log_det = flow(x)
    assert z.shape == x.shape and log_det.shape == (2,)
    torch.testing.assert_close(flow.inverse(z), x, rtol=1e-10, atol=1e-10)
    for i in range(2):
        jac = jacobian(lambda v: flow(v[None])[0][0], x[i]).reshape(x[i].numel(), x[i].numel())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(log_det[i], logabs, rtol=1e-8, atol=1e-8)


def test_coupling_log_scales_are_clamped():
    gen = torch.Generator().manual_seed(0)
    step = AffineCouplingStep(4, 8, 3, clamp=2.0, generator=gen)
    with torch.no_grad():
        step.subnet[-1].bias.fill_(1e4)          # an enormous raw log-scale
    with torch.no_grad():
        s, _ = step._coupling(torch.zeros(1, 2, 3, 3))
    assert float(s.max()) <= 2.0 + 1e-6


def test_nll_of_standard_normal_identity():
    z = torch.zeros(3, 2, 4, 4)
    loss = flow_nll([(z, torch.full((3,), 1.5))])
    torch.testing.assert_close(loss, torch.full((3,), -1.5))
    z = torch.ones(1, 2, 2, 2)
    assert math.isclose(float(flow_nll([(z, torch.zeros(1))])), 4.0)


def test_validation_split_is_seeded_and_disjoint():
    a = split_validation(50, 0.1, torch.Generator().manual_seed(3))
    b = split_validation(50, 0.1, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    train, val = a
    assert len(val) == 5 and len(train) == 45 and not set(train.tolist()) & set(val.tolist())
    assert len(split_validation(3, 0.1, torch.Generator())[1]) == 1
    assert np.array_equal(split_validation(1, 0.1, torch.Generator())[0].numpy(), [0])


def test_training_is_seeded_and_cancellable(demo):
    import pytest
    from core import Cancelled
    from core.detectors import create_detector

    train = demo.subset(split="train", label=0)
    images = [train[i] for i in range(6)]
    params = dict(resize=64, crop=None, flow_steps=2, epochs=2, batch_size=2, seed=5)
    a = create_detector("fastflow", **params).fit(images)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    b = create_detector("fastflow", **params).fit(images)
    assert torch.equal(torch.rand(3), expected_next), "fit must leave the caller's torch RNG where it was"
    assert a.history_ == b.history_ and len(a.history_) == 2 and "val_nll" in a.history_[0]
    for (ka, va), (kb, vb) in zip(a.head_.state_dict().items(), b.head_.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    epochs_seen = []

    def stop(stage, done, total):
        if stage == "epoch":
            epochs_seen.append(done)
            raise Cancelled()
    with pytest.raises(Cancelled):
        create_detector("fastflow", **params).fit(images, stop)
    assert epochs_seen == [1]


def test_each_stage_keeps_its_best_validation_epoch(demo):
    from core.detectors import create_detector

    train = demo.subset(split="train", label=0)
    images = [train[i] for i in range(10)]
    # lr 3e-3 on ten images makes the stages peak at different epochs (measured: 6, 5, 5).
    det = create_detector("fastflow", resize=64, flow_steps=2, epochs=6, batch_size=2, val_fraction=0.3,
                          lr=3e-3).fit(images)
    per_stage = np.array([h["val_nll_stages"] for h in det.history_])  # (epochs, stages)
    assert per_stage.shape == (6, len(det.stages))
    assert det.best_epoch_ == (per_stage.argmin(axis=0) + 1).tolist()
    assert len(set(det.best_epoch_)) > 1, "the case no longer tells per-stage from joint selection"
    # The kept flows are those epochs' weights: they reproduce each stage's best validation NLL.
    _, val_idx = split_validation(len(images), 0.3, torch.Generator().manual_seed(det.seed))
    kept = det._mean_nll(det.head_, [f[val_idx] for f in det._features(images, lambda *a: None)])
    np.testing.assert_allclose(kept, per_stage.min(axis=0), rtol=1e-4)
    # The LayerNorms learn nothing: a learned scale outside the loss's log-det lets the NLL collapse.
    assert all(sum(p.numel() for p in norm.parameters()) == 0 for norm in det.head_.norms)


def test_models_saved_with_a_learned_layernorm_still_load(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    from core.detectors import create_detector, load_detector

    train = demo.subset(split="train", label=0)
    images = [train[i] for i in range(4)]
    det = create_detector("fastflow", resize=64, flow_steps=2, epochs=1, batch_size=2).fit(images)
    folder = det.save(tmp_path / "model")
    # What an earlier version wrote: the same file plus each LayerNorm's learned scale and shift.
    tensors = load_file(folder / "fitted.safetensors")
    for k, norm in enumerate(det.head_.norms):
        tensors[f"head.norms.{k}.weight"] = torch.full(norm.normalized_shape, 0.5)
        tensors[f"head.norms.{k}.bias"] = torch.zeros(norm.normalized_shape)
    save_file(tensors, folder / "fitted.safetensors")
    old = load_detector(folder)
    assert all(torch.equal(n.weight, torch.full(n.normalized_shape, 0.5)) for n in old.head_.norms)
    assert not np.allclose(old.predict(images).scores, det.predict(images).scores)

"""RegAD's pieces: the pose transform, the support augmentation, registration training and its file."""
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import DEMO
from core import metrics
from core.cli import main
from core.detectors import create_detector
from core.detectors.regad import augment_support, rotation_theta, train_registration, warp


def test_a_quarter_turn_theta_turns_a_map_by_ninety_degrees():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    same = warp(x, rotation_theta(torch.zeros(1), (6, 6)))
    assert torch.allclose(same, x, atol=1e-4)
    turned = warp(x, rotation_theta(torch.full((1,), math.pi / 2), (6, 6)))
    quarter = [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 3)]
    assert min((turned - q).abs().max() for q in quarter) < 1e-3
    # On a non-square map the rotation is in pixels: a 180 degree turn is an exact flip of both axes.
    wide = torch.arange(24.0).view(1, 1, 4, 6)
    half = warp(wide, rotation_theta(torch.full((1,), math.pi), (4, 6)))
    assert torch.allclose(half, wide.flip(-1).flip(-2), atol=1e-3)


def test_support_augmentation_gives_the_papers_variants():
    square, wide = torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 48)
    assert len(augment_support(square)) == 2 * 18     # original, 8 rotations, 4 shifts, flip, grey, 3 turns
    assert len(augment_support(wide)) == 16           # a quarter turn would not fit a wide frame: 180 only
    out = augment_support(square)
    assert torch.equal(out[:2], square) and torch.equal(out[-2:], torch.rot90(square, 3, dims=(-2, -1)))


@pytest.fixture(scope="module")
def registration(demo, tmp_path_factory):
    good = demo.subset(split="train", label=0)
    path = tmp_path_factory.mktemp("regad") / "registration.safetensors"
    # Two "categories" from the demo: enough for the mechanics (the benchmark trains on real categories).
    images = [good[i] for i in range(len(good))]
    return train_registration({"a": images[:14], "b": images[14:]}, path, size=96, steps=6, batch_pairs=2,
                              log=lambda m: None)


def test_registration_file_names_its_training_and_drives_the_detector(demo, registration):
    with safe_open(str(registration), "pt") as f:
        header = f.metadata()
    assert header["backbone"] == "tf_efficientnet_lite0" and header["categories"] == '{"a": 14, "b": 14}'
    good = demo.subset(split="train", label=0)
    test = demo.subset(split="test")
    shots = [good[i] for i in (0, 7, 14, 21)]
    plain = create_detector("regad", resize=128, calibration_fraction=0).fit(shots)
    registered = create_detector("regad", registration=str(registration), resize=128, calibration_fraction=0).fit(shots)
    assert metrics.image_auroc(test.labels, registered.score_maps(test)[0]) > 0.6
    # The trained transformers are not the identity: they change the registered features.
    assert not np.allclose(plain.score_maps(test[:2])[0], registered.score_maps(test[:2])[0])
    assert registered.model_card()["registration"] == str(registration)


def test_a_registration_for_other_stages_is_refused(demo, registration):
    good = demo.subset(split="train", label=0)
    with pytest.raises(ValueError, match="another backbone or stages"):
        create_detector("regad", registration=str(registration), stages=(1, 2), calibration_fraction=0).fit(good[:2])
    with pytest.raises(ValueError, match="regad-train"):
        create_detector("regad", registration="/nonexistent.safetensors", calibration_fraction=0).fit(good[:2])


def test_cli_trains_a_registration(tmp_path, capsys):
    out = tmp_path / "reg.safetensors"
    assert main(["regad-train", "--data", str(DEMO), "--out", str(out), "--steps", "2", "--size", "64"]) == 0
    assert out.is_file() and f"registration={out}" in capsys.readouterr().out

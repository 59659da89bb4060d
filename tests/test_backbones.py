"""Offline ImageNet weights really load, and missing weights fail loudly."""
import numpy as np
import pytest
import torch
from skimage import data as skdata

from core.backbones import (FeatureExtractor, WeightsUnavailable, create_classifier, lite_state_dict_to_timm,
                            offline_weights_path)
from core.data import Preprocess

CATS = {281, 282, 283, 284, 285}   # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_efficientnet_lite0_recognises_imagenet_classes():
    model = create_classifier("tf_efficientnet_lite0")
    prep = Preprocess(resize=224, crop=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        top = model(prep.images_to_tensor([skdata.chelsea(), skdata.coffee()])).argmax(1).tolist()
    assert top[0] in CATS and top[1] == ESPRESSO


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_other_lite_weights_load_strictly(name):
    # Loading is strict (a key the rename misses raises); the check is that every tensor came from the file.
    model = create_classifier(name)
    state = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    renamed = lite_state_dict_to_timm(state, model)
    assert renamed.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in renamed.items())


def test_large_inputs_go_through_in_tiles_without_seams():
    from core.backbones import TILE
    extractor = FeatureExtractor("tf_efficientnet_lite0", (2, 3))
    image = np.concatenate([skdata.astronaut(), skdata.coffee()[:, :512]], axis=0)   # 912 x 512
    x = Preprocess(resize=(1184, 672), crop=None, mean=(0.5,) * 3, std=(0.5,) * 3).images_to_tensor([image])
    assert max(x.shape[-2:]) > TILE + 128
    tiled = extractor(x)
    whole = extractor.model(x)                  # one pass over the whole image, for reference
    assert [t.shape[-2:] for t in extractor(x[..., :1190 - 12, :660])] == [(148, 83), (74, 42)]  # any size
    for t, w, stride in zip(tiled, whole, extractor.strides):
        assert t.shape == w.shape == (1, w.shape[1], 1184 // stride, 672 // stride)
        # Only context beyond the margin is lost: the features agree closely, at the seams too.
        seam = TILE // stride
        assert (t - w).abs().max() < 0.03 * w.abs().max()
        assert (t - w)[..., seam - 2:seam + 2].abs().mean() < 0.015 * w.abs().mean()


def test_a_cpu_batch_runs_in_small_calls_with_the_same_maps(monkeypatch):
    import core.backbones as backbones
    extractor = FeatureExtractor("tf_efficientnet_lite0", (2, 3))
    x = torch.randn(5, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    calls, model = [], extractor.model

    class Counting(torch.nn.Module):
        def forward(self, part):
            calls.append(len(part))
            return model(part)
    monkeypatch.setattr(extractor, "model", Counting())
    monkeypatch.setattr(backbones, "CPU_PIXELS_PER_CALL", 2 * 96 * 128)
    split = extractor(x)
    assert calls == [2, 2, 1]
    whole = model(x.contiguous())           # one NCHW call over the whole batch, for reference
    for got, want in zip(split, whole):
        assert got.is_contiguous() and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_feature_extractor_reports_real_shapes():
    extractor = FeatureExtractor("tf_efficientnet_lite0", (1, 2, 3))
    maps = extractor(torch.zeros(2, 3, 224, 224))
    assert [m.shape[1] for m in maps] == list(extractor.channels) == [24, 40, 112]
    assert [224 // m.shape[-1] for m in maps] == list(extractor.strides) == [4, 8, 16]
    assert extractor.mean == (0.5, 0.5, 0.5)
    extractor.train()
    assert not extractor.model.training, "a frozen backbone never switches batch norm to training"


def test_blocks_past_the_last_stage_asked_are_dropped_and_change_nothing():
    x = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    every = FeatureExtractor("tf_efficientnet_lite0", (0, 1, 2, 3, 4))
    full = every(x)
    for stages, n_blocks in [((1, 2), 3), ((2, 3), 5), ((4,), 7)]:
        extractor = FeatureExtractor("tf_efficientnet_lite0", stages)
        assert len(extractor.model.blocks) == n_blocks
        for got, stage in zip(extractor(x), stages):
            assert torch.equal(got, full[stage])


def test_feature_extractor_matches_the_classifier_weights():
    features = FeatureExtractor("tf_efficientnet_lite0", (0,))
    classifier = create_classifier("tf_efficientnet_lite0")
    np.testing.assert_array_equal(features.model.conv_stem.weight.numpy(), classifier.conv_stem.weight.detach().numpy())


def test_missing_weights_are_an_error_that_says_what_to_do(tmp_path, monkeypatch):
    import timm
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:   # what an air-gapped machine sees, without waiting on its network
            raise OSError("could not reach the Hugging Face hub")
        return real_create(name, **kwargs)
    monkeypatch.setattr("core.backbones.timm.create_model", offline_create)
    with pytest.raises(WeightsUnavailable, match="weights=.*tf_efficientnet_lite0"):
        FeatureExtractor("resnet18", (2, 3))
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        FeatureExtractor("resnet18", (2, 3), weights=tmp_path / "nowhere.pth")

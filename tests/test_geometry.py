"""Input geometry: aspect ratio kept, no crop by default, maps back in each image's own frame, old models."""
import json

import numpy as np
import pytest

from core.data import Preprocess, fit_frame
from core.detectors import create_detector, load_detector


def test_frame_keeps_the_median_aspect_ratio():
    assert fit_frame([(500, 1260)] * 3, 512) == (192, 512)        # wide: 512 * 500 / 1260 = 203 -> 192
    assert fit_frame([(1260, 500)], 512) == (512, 192)            # tall
    assert fit_frame([(900, 900), (900, 910), (300, 900)], 256) == (256, 256)   # the median wins
    assert fit_frame([(10, 1000)], 256) == (32, 256)              # never thinner than one stride
    with pytest.raises(ValueError):
        fit_frame([], 256)


def test_rectangular_preprocess_round_trips_maps_and_masks():
    pp = Preprocess(resize=(48, 96), crop=None)
    image = np.zeros((100, 200, 3), np.uint8)
    assert pp.image_to_frame(image).shape == (48, 96, 3)
    assert pp.images_to_tensor([image, image]).shape == (2, 3, 48, 96)
    mask = np.zeros((100, 200), bool)
    mask[:, 150:] = True                                           # the right quarter
    frame_mask = pp.mask_to_frame(mask)
    assert frame_mask.shape == (48, 96) and frame_mask[:, 73:].all() and not frame_mask[:, :71].any()
    back = pp.map_to_input(frame_mask.astype(np.float32), (100, 200))
    assert back.shape == (100, 200)
    assert back[:, 152:].min() > 0.99 and back[:, :148].max() < 0.01   # the same region, in the image's frame
    assert Preprocess.from_dict(pp.to_dict()) == pp
    with pytest.raises(ValueError, match="input"):
        pp.input_size                                              # only square inputs have one side


def test_crop_must_fit_the_shorter_side():
    assert Preprocess(resize=(64, 128), crop=64).input_hw == (64, 64)
    with pytest.raises(ValueError, match="shorter side"):
        Preprocess(resize=(64, 128), crop=96)


def _tall_parts(rng, n, defect_at_border=False):
    """Tall 160 x 64 'parts': a smooth gradient plus noise; optionally a dark blob at the bottom edge."""
    images = []
    for _ in range(n):
        base = np.linspace(90, 170, 160)[:, None, None] + rng.normal(0, 6, (160, 64, 3))
        if defect_at_border:
            base[148:, 24:40] = 10
        images.append(np.clip(base, 0, 255).astype(np.uint8))
    return images


def test_patchcore_sees_a_tall_image_whole_and_scores_a_defect_at_its_border():
    rng = np.random.default_rng(0)
    train = _tall_parts(rng, 6)
    good, bad = _tall_parts(rng, 3), _tall_parts(rng, 3, defect_at_border=True)
    det = create_detector("patchcore", resize=128, coreset_ratio=0.2).fit(train)
    assert det.frame() == (128, 64) and det.fit_info_["input_frame_hw"] == [128, 64]
    assert det.fit_info_["aspect_stretch"] == pytest.approx(64 / 128 / (64 / 160), rel=1e-6)
    prediction = det.predict(good + bad)
    assert all(m.shape == (160, 64) for m in prediction.maps)
    assert prediction.scores[3:].min() > prediction.scores[:3].max()
    worst = np.unravel_index(prediction.maps[3].argmax(), (160, 64))
    assert worst[0] > 130, "the map peaks at the defect, at the bottom border"
    # The paper's square crop (resize 128 squashed, crop 112) cuts the defect away.
    cropped = create_detector("patchcore", resize=(128, 128), crop=112, coreset_ratio=0.2).fit(train)
    assert cropped.predict(good + bad).scores[3:].min() < prediction.scores[3:].min()


def test_auto_resize_follows_the_images_own_size():
    rng = np.random.default_rng(1)
    small = [rng.integers(0, 255, (120, 200, 3), dtype=np.uint8) for _ in range(2)]
    det = create_detector("patchcore", coreset_ratio=0.5).fit(small)
    assert det.frame() == (160, 256)            # below 256 px the backbone's pretraining scale wins
    with pytest.raises(ValueError, match="resize must be"):
        create_detector("patchcore", resize="big").fit(small)


def test_version_1_models_load_with_their_square_frame_and_score_as_before(tmp_path, demo):
    train = demo.subset(split="train")[:4]
    det = create_detector("patchcore", resize=(64, 64), crop=56, coreset_ratio=0.1).fit(train)
    folder = det.save(tmp_path / "model")
    # What version 1 wrote: an int resize meaning a square, no saved frame.
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 1
    config["params"]["resize"] = 64
    del config["input_frame"]
    (folder / "config.json").write_text(json.dumps(config))
    old = load_detector(folder)
    assert old.frame() == (64, 64) and old.preprocess == det.preprocess
    test = demo.subset(split="test")[:3]
    np.testing.assert_array_equal(old.score_maps(test)[0], det.score_maps(test)[0])

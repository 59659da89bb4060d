"""CPR's pieces against hand-made cases: block histograms, windowed retrieval, global retrieval, foreground."""
import numpy as np
import torch
import torch.nn.functional as F

from core.detectors import create_detector, load_detector
from core.detectors.cpr import FAR, block_histograms, window_min_distance


def test_block_histograms_count_words_per_block():
    words = torch.tensor([[[0, 0, 1, 1],
                           [0, 2, 1, 1],
                           [2, 2, 0, 0],
                           [2, 2, 0, 1]]])
    hist = block_histograms(words, n_words=3, blocks=2)
    assert hist.shape == (1, 4, 3)
    assert torch.allclose(hist[0], torch.tensor([[0.75, 0.0, 0.25],     # top left: 0 0 0 2
                                                 [0.0, 1.0, 0.0],       # top right: all 1
                                                 [0.0, 0.0, 1.0],       # bottom left: all 2
                                                 [0.75, 0.25, 0.0]]))   # bottom right: 0 0 0 1


def test_a_patch_finds_its_match_only_within_the_window():
    ref = F.normalize(torch.randn(1, 8, 6, 6), dim=1)
    query = torch.roll(ref[0], shifts=1, dims=2)         # every patch one cell to the right of its match
    assert torch.allclose(window_min_distance(query, ref, 3)[:, 1:], torch.zeros(6, 5), atol=1e-6)
    assert (window_min_distance(query, ref, 1)[:, 1:] > 0.05).all()
    # The nearest of several references wins; a padded position never does.
    two = torch.cat([ref, F.normalize(torch.randn(1, 8, 6, 6), dim=1)])
    assert torch.allclose(window_min_distance(ref[0], two, 1), torch.zeros(6, 6), atol=1e-6)
    assert window_min_distance(ref[0], ref, 5).max() < FAR


def test_tiled_window_search_equals_a_brute_force_search():
    torch.manual_seed(0)
    refs = F.normalize(torch.randn(3, 5, 11, 19), dim=1)      # sizes that are not whole tiles
    query = F.normalize(torch.randn(5, 11, 19), dim=0)
    for window in (3, 5, 7, 11):                                # offset by offset up to 5, tiled above
        r = window // 2
        expected = torch.empty(11, 19)
        for y in range(11):
            for x in range(19):
                patch = refs[:, :, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
                expected[y, x] = 1 - torch.einsum("c,kcij->kij", query[:, y, x], patch).max()
        assert torch.allclose(window_min_distance(query, refs, window), expected, atol=1e-5)


def test_global_retrieval_finds_the_image_itself_first(demo):
    train = [demo[i] for i in range(len(demo)) if demo.samples[i].split == "train"]
    det = create_detector("cpr", resize=128, n_neighbours=3, windows=(3, 1), calibration_fraction=0).fit(train)
    feats = det.embed(det.preprocess.images_to_tensor(train[:4]))
    near = det.retrieve(det._histograms(feats[0]), 3)
    assert near.shape == (4, 3) and near[:, 0].tolist() == [0, 1, 2, 3]
    # The automatic search scores held-out images with their own image left out: never retrieved.
    without_self = det.retrieve(det._histograms(feats[0]), 3, exclude=torch.arange(4))
    assert torch.equal(without_self[:, :2], near[:, 1:])
    everything_else = det.retrieve(det._histograms(feats[0]), len(train), exclude=torch.arange(4))
    assert everything_else.shape == (4, len(train) - 1) and not (everything_else == torch.arange(4)[:, None]).any()
    # Each training image scores near zero against itself: its own patches are in the window.
    scores, _ = det.score_maps(train[:4])
    defect = [demo[i] for i in range(len(demo)) if demo.samples[i].label == 1][:4]
    assert scores.max() < det.score_maps(defect)[0].min()


def test_foreground_weight_is_high_on_the_object_and_low_on_the_background():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(12):
        image = np.full((128, 128, 3), 40, np.uint8)                       # plain dark background
        image[32:96, 32:96] = rng.integers(120, 255, (64, 64, 3))         # a textured object in the middle
        images.append(image)
    det = create_detector("cpr", resize=128, foreground=True, calibration_fraction=0).fit(images)
    weight = det._object_weight(det.embed(det.preprocess.images_to_tensor(images[:1]))[0])[0]
    h, w = weight.shape
    assert weight[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].mean() > 0.8
    assert weight[:2].mean() < 0.2 and det.model_card()["retrieval"]["foreground"] is True


def test_auto_search_is_chosen_on_held_out_images_recorded_and_kept_on_reload(demo, tmp_path):
    good = demo.subset(split="train", label=0)
    det = create_detector("cpr", resize=128, calibration_fraction=0).fit(good)
    auto = det.fit_info_["auto_settings"]
    tried = [(r["n_neighbours"], tuple(r["windows"])) for r in auto["candidates"]]
    assert tried[0] == (10, (3, 1)) and (det.n_neighbours_, det.windows_) in tried
    assert auto["n_held_out"] == 6 and "held-out good images" in auto["why"]
    assert det.fold_params()["n_neighbours"] == det.n_neighbours_      # the cross-fit's folds do not search again
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    assert (again.n_neighbours_, again.windows_) == (det.n_neighbours_, det.windows_)
    test = demo.subset(split="test")
    assert np.array_equal(again.score_maps(test[:2])[0], det.score_maps(test[:2])[0])

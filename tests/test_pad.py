"""PAD's pieces: alignment against known transforms, the generated posed sets, and the detector on a tiny
rendered set (the registry-wide contract is in test_detectors.py)."""
import json

import cv2
import numpy as np
import pytest

from benchmarks import render_bricks, rotate_set
from core import metrics
from core.data import load_mvtec
from core.detectors import create_detector, load_detector
from core.detectors.pad import align

TINY = {"n_train": 36, "n_test_good": 6, "n_per_defect": 3, "size": 96, "spp": 4}


@pytest.fixture(scope="module")
def textured_frame():
    from skimage.data import chelsea        # a photo scikit-image ships: texture enough for SIFT
    return cv2.resize(chelsea(), (192, 192), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def tiny_bricks(tmp_path_factory):
    pytest.importorskip("mitsuba")
    return render_bricks.generate(tmp_path_factory.mktemp("bricks") / "set", **TINY)


def corner_error(found: np.ndarray, true: np.ndarray, side: int) -> float:
    """Largest distance, in pixels, between where two homographies send a central square's corners."""
    square = np.float32([[0.3, 0.3], [0.7, 0.3], [0.7, 0.7], [0.3, 0.7]])[None] * side
    return float(np.abs(cv2.perspectiveTransform(square, found) - cv2.perspectiveTransform(square, true)).max())


@pytest.mark.parametrize("method", ["features", "rotation", "auto"])
def test_alignment_recovers_a_known_pose(textured_frame, method):
    side = textured_frame.shape[0]
    rotation = np.vstack([cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), 127, 1.0), [0, 0, 1]])
    tilt = cv2.getPerspectiveTransform(np.float32([[0, 0], [191, 0], [191, 191], [0, 191]]),
                                       np.float32([[4, -3], [189, 5], [194, 188], [-2, 193]]))
    true = rotation if method == "rotation" else tilt @ rotation      # ECC fits an affine map: no tilt for it
    target = cv2.warpPerspective(textured_frame, true, (side, side), borderMode=cv2.BORDER_REPLICATE)
    found, quality, used = align(textured_frame, target, method)
    assert corner_error(found, true, side) < 3.0 and quality > 0.9
    assert used == method or method == "auto"


def test_alignment_none_is_the_identity(textured_frame):
    found, _, used = align(textured_frame, np.rot90(textured_frame).copy(), "none")
    assert used == "none" and np.array_equal(found, np.eye(3))


def test_rendered_set_is_deterministic_and_masks_mark_exactly_the_changed_pixels(tiny_bricks, tmp_path):
    again = render_bricks.generate(tmp_path / "again", **{**TINY, "n_train": 2, "n_test_good": 1})
    for path in (again / "test").rglob("*.png"):      # the defect views share their seeded streams
        rel = path.relative_to(again)
        if rel.parts[1] != "good":
            assert path.read_bytes() == (tiny_bricks / rel).read_bytes(), rel
    assert (again / "train/good/000.png").read_bytes() == (tiny_bricks / "train/good/000.png").read_bytes()
    views = json.loads((tiny_bricks / "views.json").read_text())["views"]
    assert len(views) == 36 + 6 + 4 * 3
    mi = render_bricks._mitsuba()
    for defect in render_bricks.DEFECTS:
        image, twin, mask, view = render_bricks.defective_view(mi, defect, 96, 4, np.random.default_rng(1), 0)
        assert mask.mean() >= render_bricks.MIN_DEFECT_SHARE
        assert np.array_equal(mask, render_bricks.changed_pixels(image, twin))
        # Outside the mask the two renders are bit-identical, but for a pixel or two of sub-tolerance edge shading.
        touched = (image != twin).any(-1)
        assert (touched & ~mask).sum() <= max(2, mask.sum() // 10)
    data = load_mvtec(tiny_bricks)
    assert sorted(set(data.defects)) == sorted(["good", *render_bricks.DEFECTS])
    assert all(data.mask(i).any() for i in range(len(data)) if data.samples[i].label == 1)


def test_rotated_set_moves_each_mask_with_its_image(tmp_path):
    source = tmp_path / "src"
    rng = np.random.default_rng(0)
    image = rng.integers(60, 120, (96, 96, 3), dtype=np.uint8)
    image[30:50, 40:70] = (250, 20, 20)                        # the "defect": a red patch
    mask = np.zeros((96, 96), np.uint8)
    mask[30:50, 40:70] = 255
    for rel, arr in {"train/good/a.png": rng.integers(60, 120, (96, 96, 3), dtype=np.uint8),
                     "test/good/b.png": rng.integers(60, 120, (96, 96, 3), dtype=np.uint8),
                     "test/red/c.png": image, "ground_truth/red/c_mask.png": mask}.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(source / rel), arr if arr.ndim == 2 else arr[..., ::-1])
    out = rotate_set.generate(source, tmp_path / "posed", train_copies=3, seed=4)
    posed = load_mvtec(out)
    assert len(posed.subset(split="train")) == 3
    i = posed.defects.index("red")
    red = (posed[i][..., 0] > 170) & (posed[i][..., 1] < 100)
    moved = posed.mask(i)
    assert not np.array_equal(moved, mask > 0), "the pose moved it"
    assert (red & moved).sum() / (red | moved).sum() > 0.9
    assert rotate_set.generate(source, tmp_path / "again", train_copies=3, seed=4).joinpath(
        "poses.json").read_text() == (out / "poses.json").read_text()


def test_pad_finds_rendered_defects_at_unseen_poses_better_than_patchcore(tiny_bricks, tmp_path):
    data = load_mvtec(tiny_bricks)
    train, test = data.subset(split="train"), data.subset(split="test")
    masks = [test.mask(i) if test.labels[i] else np.zeros((96, 96), bool) for i in range(len(test))]
    pad = create_detector("pad", resize=96, calibration_fraction=0).fit(train)
    maps = pad.score_maps(test)[1]
    core = create_detector("patchcore", resize=96, coreset_ratio=0.1, score_border=0, calibration_fraction=0).fit(train)
    # Localisation only: at 36 views and 18 test images the image-level AUROC is noise (0.4 to 0.55 measured).
    assert metrics.pixel_auroc(masks, maps) > max(0.85, metrics.pixel_auroc(masks, core.score_maps(test)[1]) + 0.03)
    # The references it compares with, as the Heatmaps page shows them, survive a save and load.
    pad.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    frame = pad.preprocess.image_to_frame(test[0])
    before, after = pad.aligned_references(frame), again.aligned_references(frame)
    assert [r.index for r in before] == [r.index for r in after] and len(before) == pad.n_references
    assert np.array_equal(before[0].warped, after[0].warped) and before[0].warped.shape == frame.shape
    card = again.model_card()["pad"]
    assert "NeRF" in card["ours"] and card["training_views"] == 36


def test_warped_in_padding_is_marked_invalid(demo):
    train = demo.subset(split="train")[:6]
    pad = create_detector("pad", resize=64, n_candidates=2, n_references=1, calibration_fraction=0).fit(train)
    frame = pad.preprocess.image_to_frame(train[0])
    turned = cv2.warpAffine(frame, cv2.getRotationMatrix2D((31.5, 31.5), 45, 1.0), (64, 64))
    ref = pad.aligned_references(turned)[0]
    # The reference turned by 45 degrees leaves the corners of the test frame uncovered.
    assert not ref.valid[:6, :6].any() and ref.valid[24:40, 24:40].all()


@pytest.mark.parametrize("bad, message", [({"n_references": 4, "n_candidates": 2}, "cannot exceed"),
                                          ({"alignment": "nerf"}, "alignment must be one of"),
                                          ({"min_matches": 3}, "min_matches must be"),
                                          ({"windows": (4, 3)}, "one odd window side")])
def test_bad_parameters_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        create_detector("pad", **bad).check_params()

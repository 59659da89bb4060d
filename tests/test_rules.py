"""Defect rules against hand-made maps: which regions count, what they measure, and which rule decides."""
import numpy as np
import pytest

from core.data import Preprocess
from core.rules import OUTSIDE_ROI, TOO_SMALL, DefectRules, decide, find_regions
from core.runs import RunStore


def two_spots() -> np.ndarray:
    """A 100 x 200 map: a 10 x 20 spot (200 px) top left at level 5, a 2 x 2 one (4 px) bottom right at 4."""
    amap = np.zeros((100, 200), np.float32)
    amap[10:20, 10:30] = 5.0
    amap[80:82, 150:152] = 4.0
    return amap


RIGHT_HALF = np.zeros((50, 100), bool)   # half the map's resolution: resized to it
RIGHT_HALF[:, 50:] = True


def test_regions_are_measured_in_image_pixels():
    regions = find_regions(two_spots(), 3.0, DefectRules())
    assert [(r.box, r.area, r.peak, r.ignored) for r in regions] == [
        ((10, 10, 30, 20), 200.0, 5.0, None), ((150, 80, 152, 82), 4.0, 4.0, None)]
    assert regions[0].centre == (20, 15)
    # The same map said to come from an image twice the size: boxes and areas scale with it.
    big = find_regions(two_spots(), 3.0, DefectRules(), image_hw=(200, 400))
    assert big[0].box == (20, 20, 60, 40) and big[0].area == 800.0
    # A map in a model frame resized to 50 x 100 and centre-cropped to 40 x 40 (offset y 5, x 30).
    frame_map = np.zeros((40, 40), np.float32)
    frame_map[0:4, 0:2] = 9.0
    pre = Preprocess(resize=(50, 100), crop=40)
    [region] = find_regions(frame_map, 1.0, DefectRules(), pre, image_hw=(100, 200))
    assert region.box == (60, 10, 64, 18) and region.area == 8 * 4.0


def test_roi_and_minimum_area_clear_a_verdict_and_say_why():
    amap = two_spots()
    assert decide(5.0, amap, 3.0, None, 3.0, DefectRules()).label == "NG"
    # The big spot is outside the ROI; the small one inside but below the minimum area.
    decision = decide(5.0, amap, 3.0, 2.0, 3.0, DefectRules(RIGHT_HALF, min_area=10))
    assert decision.label == "OK" and [r.ignored for r in decision.regions] == [OUTSIDE_ROI, TOO_SMALL]
    assert decision.rule == f"every region above the pixel threshold is {OUTSIDE_ROI} or {TOO_SMALL}"
    # With a smaller minimum the small spot counts, and the verdict names where it is.
    decision = decide(5.0, amap, 3.0, 2.0, 3.0, DefectRules(RIGHT_HALF, min_area=4))
    assert decision.label == "NG" and decision.rule == "defect region at x=151, y=81 (4 px)"
    assert decide(2.5, amap, 3.0, 2.0, 3.0, DefectRules(RIGHT_HALF)).label == "review"
    # Rules never raise a verdict: a low score is OK whatever the map shows.
    decision = decide(1.0, amap, 3.0, 2.0, 3.0, DefectRules(RIGHT_HALF))
    assert decision.label == "OK" and decision.rule == "score 1 below the review threshold 2"


def test_a_region_across_the_roi_border_counts_only_its_inside_part():
    amap = np.zeros((100, 200), np.float32)
    amap[40:50, 90:110] = 5.0                      # 10 x 20, half of it right of x = 100
    [region] = find_regions(amap, 3.0, DefectRules(RIGHT_HALF))
    assert region.area == 100.0 and region.box == (100, 40, 110, 50) and region.ignored is None
    assert decide(5.0, amap, 3.0, None, 3.0, DefectRules(RIGHT_HALF, min_area=101)).label == "OK"


def test_nothing_that_is_not_a_number_passes():
    amap = np.zeros((100, 200), np.float32)
    assert decide(float("nan"), amap, 3.0, None, 3.0, DefectRules(RIGHT_HALF)).label == "NG"
    amap[50, 150] = np.nan                             # a broken pixel inside the ROI is a region
    decision = decide(9.0, amap, 3.0, None, 3.0, DefectRules(RIGHT_HALF))
    assert decision.label == "NG" and decision.counted[0].area == 1.0
    # A high score with no region at the pixel threshold: nothing for the rules to clear.
    decision = decide(9.0, np.zeros((100, 200), np.float32), 3.0, None, 3.0, DefectRules(RIGHT_HALF))
    assert decision.label == "NG" and "no region reaches the pixel threshold" in decision.rule


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="empty"):
        DefectRules(np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="minimum defect area"):
        DefectRules(min_area=-1)
    with pytest.raises(ValueError, match="mm per pixel"):
        DefectRules(mm_per_px=0)


def test_rules_are_saved_with_the_run(tmp_path):
    store = RunStore(tmp_path / "registry.sqlite")
    ds = store.add_dataset("d", str(tmp_path), "folder", {}, {})
    rid = store.add_run(dataset_id=ds, detector="patchcore", params={}, model_path="m", metrics={}, timings={},
                        model_card={}, scores=[])
    assert DefectRules.of_run(store.get_run(rid)).empty
    rules = DefectRules(RIGHT_HALF, min_area=12.5, mm_per_px=0.05)
    store.set_rules(rid, rules)
    back = DefectRules.of_run(store.get_run(rid))
    assert np.array_equal(back.roi, RIGHT_HALF) and back.min_area == 12.5 and back.mm_per_px == 0.05
    assert back.describe() == "region of interest (50% of the image), minimum defect area 12.5 px (0.0313 mm²)"
    store.set_rules(rid, None)
    assert DefectRules.of_run(store.get_run(rid)).empty
    with pytest.raises(KeyError):
        store.set_rules(rid + 1, rules)


def test_the_drawn_region_flags_the_pixels_the_rules_count():
    from core.app.render import predicted_region
    amap = np.zeros((8, 8), np.float32)
    amap[1, 1] = np.nan                      # a broken pixel is never OK, drawn or counted
    amap[5:7, 5:7] = 2.0
    drawn = predicted_region(amap, 1.0)
    assert drawn[1, 1] and drawn[5:7, 5:7].all() and drawn.sum() == 5
    assert sorted(r.area for r in find_regions(amap, 1.0, DefectRules())) == [1, 4]


def test_an_ng_image_without_a_pixel_at_the_pixel_threshold_shows_its_hottest_region():
    from core.app.render import HOTTEST, PREDICTED, region_panel, why_region
    amap = np.full((40, 40), 0.1, np.float32)
    amap[10:14, 20:24] = 0.8                                   # hot, but under the pixel threshold 1.0
    region, hottest = why_region(amap, 1.0, flagged=True)
    assert hottest and region[10:14, 20:24].all() and region.sum() == 16
    drawn = region_panel(np.zeros((40, 40, 3), np.uint8), amap, 1.0, flagged=True)
    assert (drawn == HOTTEST).all(-1).any() and not (drawn == PREDICTED).all(-1).any()
    assert not why_region(amap, 1.0)[0].any()                  # an OK image has nothing to explain
    roi = np.zeros((40, 40), bool)
    roi[:, :10] = True                                         # the hot spot lies outside the region of interest
    amap[5, 5] = 0.3
    region, _ = why_region(amap, 1.0, roi, flagged=True)
    assert region[5, 5] and region.sum() == 1
    amap[10:14, 20:24] = 2.0                                   # now over it: the predicted region, not the hottest
    region, hottest = why_region(amap, 1.0, flagged=True)
    assert not hottest and region.sum() == 16

"""Reviewing a run in a real browser, as a quality engineer does: open a tile's detail where they are looking, filter
the gallery, leave the page and come back to the same filters, mark a false alarm good and find it in the next fit's
training set. Screenshots land in tests/artifacts/review_*.png.
"""
import re

import numpy as np

from core.pipeline import open_dataset, train_run

from .browser_kit import BROWSER, go, settle, shot

pytestmark = BROWSER

FAST = {"resize": 64, "coreset_ratio": 0.05, "score_border": 0, "calibration_fraction": 0}
# The visible buttons, chips and words whose text is wider than their box: cut off with an ellipsis or scrolled away.
CUT_OFF = """() => [...document.querySelectorAll('button, [data-testid=stMarkdownContainer] :is(p, span), label')]
    .filter(e => e.offsetParent !== null && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
    .map(e => e.innerText)"""


def test_review_a_run_and_mark_a_false_alarm_good_in_a_browser(workspace, page):
    store, run_id, dataset_id = workspace["store"], workspace["run_id"], workspace["dataset_id"]
    scores = store.run_scores(run_id).query("split == 'test'").reset_index(drop=True)
    good = np.sort(scores.query("label == 0")["score"].to_numpy())
    store.set_threshold(run_id, image=float(good[-2:].mean()))   # the highest-scoring good image: a false alarm
    alarm = scores["path"][scores.query("label == 0")["score"].idxmax()]

    page.get_by_role("heading", name="AnomalyScope").wait_for()
    go(page, "Heatmaps")
    page.get_by_test_id("stImage").nth(22).wait_for()             # the whole gallery, no detail yet
    assert page.get_by_role("dialog").count() == 0
    assert page.evaluate(CUT_OFF) == []
    page.set_viewport_size({"width": 1024, "height": 1800})      # a laptop: the tiles and chips wrap, none is cut
    settle(page)
    assert page.evaluate(CUT_OFF) == []
    shot(page, "review_1_gallery_1024px")
    page.set_viewport_size({"width": 1440, "height": 1800})
    settle(page)
    shot(page, "review_1_gallery")

    # The last tile, low on the page, opens its detail over the page, where the user is looking.
    last = page.get_by_role("button", name=f"Score {good[0]:.3g}", exact=True)
    last.scroll_into_view_if_needed()
    last.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("A good image passed as OK.").wait_for()
    settle(page)
    box = dialog.bounding_box()
    assert box["y"] >= 0 and box["y"] + 200 < page.viewport_size["height"]     # on screen, not further down
    assert page.evaluate(CUT_OFF) == []
    shot(page, "review_2_detail")
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    settle(page)

    # Only the false alarms: click the other outcomes' pills off.
    pills = page.get_by_test_id("stButtonGroup").first
    for outcome in ("caught defect", "missed defect", "correct OK"):
        pills.get_by_role("button", name=outcome, exact=True).click()
        settle(page)
    page.get_by_text("showing 1", exact=False).wait_for()
    shot(page, "review_3_filtered")

    page.get_by_role("button", name=re.compile(r"^\W*Score [0-9]")).click()
    dialog.get_by_text("A good image judged NG.").wait_for()
    dialog.get_by_role("button", name=re.compile("Mark as good")).click()
    dialog.get_by_text(re.compile("You marked it good")).wait_for()
    settle(page)
    shot(page, "review_4_marked_good")
    [said] = store.get_dataset(dataset_id)["feedback"]
    assert (said["path"], said["verdict"], said["run_id"]) == (alarm, "good", run_id)
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")

    # Leave the page (the mark is listed on Datasets, with its undo) and come back: the same filter.
    go(page, "Datasets")
    page.get_by_role("heading", name="Marked on the Heatmaps page: 1").scroll_into_view_if_needed()
    shot(page, "review_5_datasets")
    go(page, "Heatmaps")
    page.get_by_text("showing 1", exact=False).wait_for()
    selected = page.get_by_test_id("stButtonGroup").first.get_by_role("button", pressed=True)
    assert [b.inner_text().strip() for b in selected.all()] == ["false alarm"]
    page.get_by_text("marked good", exact=True).wait_for()

    go(page, "Train")
    page.get_by_text("29 normal training images (1 added as good from the Heatmaps page)").wait_for()
    shot(page, "review_6_train")

    # The next fit of the dataset trains on it (a small PatchCore, as the Train page's job would run it).
    dataset = open_dataset(store.get_dataset(dataset_id))
    assert [s.split for s in dataset.samples if str(s.path) == alarm] == ["train"]
    card = store.get_run(train_run(store, dataset_id, dataset, "patchcore", FAST))["model_card"]
    assert card["n_images"] == 29 and card["marked_good_by_user"] == 1
    assert page.outside == [], f"requests left the machine: {page.outside}"

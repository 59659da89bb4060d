"""The threshold slider in a real browser: its numbers follow a mouse drag before the mouse is let go (the
browser counts them, Python has not heard yet), the gap preset, 'manual' after a hand move, saving with a note
and going back to an earlier threshold from the run's history."""
import re
import time

from .browser_kit import BROWSER, choose, chosen, go, metric, settle, shot

pytestmark = BROWSER


def live(page, name: str) -> str:
    """A number the slider itself shows (fn, fp, recall, precision, fpr)."""
    return page.locator(f"[data-live='{name}']").first.inner_text()


def test_the_slider_counts_during_the_drag_and_thresholds_are_saved_and_reverted(workspace, page):
    start = time.perf_counter()
    page.get_by_role("heading", name="AnomalyScope").wait_for()
    settle(page)
    go(page, "Thresholds")
    assert metric(page, "False alarms") == "0" and live(page, "fp") == "0"   # at training's F1-max threshold
    assert chosen(page, "Preset") == "F1-max on the test set"
    original = metric(page, "Threshold")

    slider = page.get_by_role("slider").first
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    where = slider.evaluate("e => (e.valueAsNumber - e.min) / (e.max - e.min)")
    thumb = 8 + where * (box["width"] - 16)             # the thumb's centre runs a thumb's half-width in
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + thumb, y)
    page.mouse.down()
    page.mouse.move(box["x"] + 2, y, steps=15)           # to the lowest threshold: every good image flagged
    assert live(page, "fp") == "6" and live(page, "fn") == "0"
    assert metric(page, "False alarms") == "0"           # still down: Python has not been told
    shot(page, "thresholds_slider_mid_drag")
    page.mouse.up()
    settle(page)
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stMetric]')].some("
                           "m => m.innerText.startsWith('False alarms') && m.innerText.trim().endsWith('6'))")
    assert metric(page, "False alarms") == "6"
    assert chosen(page, "Preset") == "Manual (moved by hand)"

    choose(page, "Preset", "Middle of the gap between good and defective scores")
    gap = page.get_by_test_id("stCaptionContainer").filter(has_text="Gap:").first
    gap_middle = re.search(r"takes (\d[\d.e+-]*\d)", gap.inner_text()).group(1)
    page.wait_for_function("t => document.body.innerText.includes('Threshold\\n\\n' + t)", arg=gap_middle)
    assert metric(page, "False alarms") == "0" and metric(page, "Missed defects") == "0"
    assert live(page, "fp") == "0"
    page.get_by_label("Note saved with it").first.fill("gap middle: most room on both sides")
    page.get_by_label("Note saved with it").first.press("Enter")
    settle(page)
    page.get_by_role("button", name=re.compile("Save image threshold")).click()
    page.get_by_text(re.compile(r"Saved with the run \(gap_middle, .*: gap middle: most room")).first.wait_for()
    shot(page, "thresholds_gap_saved")

    page.get_by_text(re.compile(r"Saved image thresholds of run #\d+ \(2\)")).click()
    page.get_by_test_id("stSelectbox").filter(has=page.get_by_text("Go back to", exact=True)).first.wait_for()
    page.get_by_role("button", name="Revert").click()
    page.get_by_text(re.compile(r"Saved with the run \(f1_max, .*: reverted to")).first.wait_for()
    settle(page)
    assert metric(page, "Threshold") == original and metric(page, "False alarms") == "0"
    assert live(page, "fn") == "0" and live(page, "recall") == "1.000"    # the slider agrees, on a score exactly
    assert workspace["store"].get_run(workspace["run_id"])["thresholds"]["saved"]["image"]["preset"] == "f1_max"
    shot(page, "thresholds_reverted")
    assert page.outside == [], f"requests left the machine: {page.outside}"
    print(f"\nthreshold browser test: {time.perf_counter() - start:.1f} s after the app was up")

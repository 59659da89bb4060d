"""End to end in a real browser: the app served by `streamlit run`, driven by headless Chromium.

Uploads the demo set as a zip (clicking Create before the upload has arrived), starts a training, reloads, cancels it
from another page's sidebar, types a wrong parameter and sees it refused, trains, leaves and returns to a running
feature-map job and cancels it, opens the heatmaps, moves
the threshold and checks the numbers change, deploys and inspects an image, then deletes the run; a screenshot of
every page lands in tests/artifacts/. Every request the browser makes must stay on the app's own host (offline
inspection PCs).
"""
import re
import time

from .browser_kit import BROWSER, DEMO, choose, demo_zip, go, metric, settle, shot

pytestmark = BROWSER


def test_upload_train_tune_inspect_and_delete_in_a_browser(page, tmp_path):
    page.get_by_role("heading", name="AnomalyScope").wait_for()
    settle(page)
    shot(page, "1_home")

    go(page, "Datasets")
    page.get_by_label("Dataset name", exact=True).fill("hazelnut upload")
    # The 5.9 MB zip goes up at 1 MB/s and Create is clicked at once, before it has arrived: the click must wait
    # for it (and say so), not be lost.
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": 1_000_000})
    page.locator("[data-testid='stFileUploader'] input[type=file]").first.set_input_files(
        files=[{"name": "hazelnut_toy.zip", "mimeType": "application/zip", "buffer": demo_zip()}])
    start = time.perf_counter()
    page.get_by_role("button", name="Create dataset").click()
    page.get_by_text("Waiting for the normal images").wait_for()
    shot(page, "2_datasets_waiting_for_upload")
    page.get_by_text("is ready").wait_for()
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1})
    settle(page)
    shot(page, "2_datasets")

    page.get_by_role("link", name="Train a model").click()
    page.get_by_role("heading", name="Train", exact=True).wait_for()
    settle(page)
    page.get_by_text("Parameters (the defaults choose from your images)").click()
    train_button = page.get_by_test_id("stMain").get_by_role("button", name="Train", exact=True)

    def set_param(name: str, value: str) -> None:
        field = page.get_by_role("textbox", name=name, exact=True)
        field.fill(value)
        field.press("Enter")
        settle(page)

    # A short fit (a 5% bank at 128 px); the training belongs to the server: a reload finds it, and another
    # page cancels it from the sidebar.
    set_param("coreset_ratio", "0.05")
    set_param("resize", "128")
    train_button.click()
    page.get_by_text("Training patchcore on hazelnut upload…").wait_for()
    shot(page, "3_train_progress")
    page.reload()
    page.get_by_text("Training patchcore on hazelnut upload…").wait_for()
    go(page, "Compare")
    sidebar = page.get_by_test_id("stSidebar")
    sidebar.get_by_text("Training patchcore on hazelnut upload").first.wait_for()
    shot(page, "3_compare_while_training")
    sidebar.get_by_role("button", name="Cancel").click()
    sidebar.get_by_role("link", name=re.compile("Training cancelled")).wait_for(timeout=120_000)
    go(page, "Train")
    page.get_by_text("Training cancelled: nothing was registered.").wait_for()

    # After the reload the form is fresh: a wrong coreset share is refused before Train is pressed, saying what
    # it takes.
    page.get_by_text("Parameters (the defaults choose from your images)").click()
    set_param("coreset_ratio", "5")
    page.get_by_text(re.compile(r"a fraction between 0 and 1 \(e.g. 0.05 for 5%")).wait_for()
    assert train_button.is_disabled()
    shot(page, "3_train_form_refuses")
    set_param("coreset_ratio", "0.05")
    set_param("resize", "128")
    train_button.click()
    page.get_by_test_id("stMain").get_by_text(re.compile(r"Run #\d+ is ready")).wait_for(timeout=600_000)
    settle(page)
    shot(page, "3_train_done")

    page.get_by_role("link", name="Browse heatmaps").click()
    page.get_by_role("heading", name="Heatmaps", exact=True).wait_for()
    page.get_by_test_id("stImage").nth(22).wait_for()    # the whole gallery (a tile opens its detail in a dialog)
    first_heatmap = time.perf_counter() - start
    settle(page)
    shot(page, "4_heatmaps")
    print(f"\nupload (Create dataset clicked) to first heatmap: {first_heatmap:.1f} s")

    go(page, "Thresholds")
    before = {k: metric(page, k) for k in ("Threshold", "Recall", "False alarms")}
    page.get_by_role("slider").first.focus()
    page.keyboard.press("Home")            # the lowest threshold: every good image becomes a false alarm
    settle(page)
    page.wait_for_function("b => document.body.innerText.indexOf(b) === -1",
                           arg=f"Threshold\n\n{before['Threshold']}")
    after = {k: metric(page, k) for k in ("Threshold", "Recall", "False alarms")}
    assert after["Threshold"] != before["Threshold"]
    assert int(after["False alarms"]) == 6 and int(before["False alarms"]) == 0   # all 6 good images now NG
    shot(page, "5_thresholds")
    page.get_by_role("button", name=re.compile("Save image threshold")).click()
    page.get_by_text("Saved with the run (manual").first.wait_for()   # shown in the image and pixel tabs

    # Feature maps are a server job too: leave the page while they compute and come back to the same job.
    go(page, "Features")
    page.get_by_role("button", name="Compute embedding maps").click()
    page.get_by_text(re.compile(r"Feature maps of run #\d+…")).first.wait_for()
    go(page, "Heatmaps")
    go(page, "Features")
    page.get_by_text(re.compile(r"Feature maps of run #\d+…")).first.wait_for()
    assert not page.get_by_role("button", name="Compute embedding maps").is_visible()
    shot(page, "6_features_computing")
    page.get_by_test_id("stMain").get_by_role("button", name="Cancel").click()
    page.get_by_test_id("stMain").get_by_text("cancelling at the next step…").wait_for()
    # UMAP is slow here: the cancellation lands between its steps while the test goes on; the end checks it.

    go(page, "Compare")
    page.get_by_role("button", name="Deploy this run").click()
    page.get_by_role("button", name=re.compile(r"Yes, deploy #\d+")).click()       # after its confirmation
    page.get_by_text(re.compile(r"Deployed now: #\d+")).wait_for()
    settle(page)
    shot(page, "7_compare")

    go(page, "Inspect")
    bad = DEMO / "test" / "colour" / "00.jpg"
    start = time.perf_counter()
    page.locator("[data-testid='stFileUploader'] input[type=file]").first.set_input_files(str(bad))
    page.get_by_text(re.compile(r"answered in \d+ ms")).wait_for()
    print(f"inspect: image chosen to verdict on screen {time.perf_counter() - start:.2f} s "
          f"({page.get_by_text(re.compile(r'answered in')).inner_text()})")
    settle(page)
    assert page.get_by_text("NG", exact=True).is_visible()
    shot(page, "8_inspect")

    # Two thresholds and a region of interest drawn in the browser: the defect is in the middle of the nut,
    # the region a box over the image's left fifth, so the verdict turns from NG to OK.
    go(page, "Thresholds")
    choose(page, "Preset", "F1-max on the test set")                      # back to F1-max from the lowest
    page.get_by_text("Review band below the threshold").click()
    settle(page)
    page.get_by_role("button", name=re.compile("Save image threshold")).click()
    page.get_by_text("Saved with the run (f1_max").first.wait_for()
    page.get_by_text("Draw on an image").click()
    settle(page)
    drawing = page.locator(".js-plotly-plot").last.locator(".nsewdrag").first
    drawing.scroll_into_view_if_needed()
    box = drawing.bounding_box()
    page.mouse.move(box["x"] + 3, box["y"] + 3)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + box["height"] - 3, steps=12)
    page.mouse.up()
    settle(page)
    page.get_by_role("button", name=re.compile("Save rules with run")).click()
    page.get_by_text(re.compile(r"Saved: region of interest \(\d+% of the image\)")).wait_for()
    shot(page, "9_defect_rules")

    go(page, "Inspect")
    page.locator("[data-testid='stFileUploader'] input[type=file]").first.set_input_files(str(bad))
    page.get_by_text(re.compile(r"answered in \d+ ms")).wait_for()
    settle(page)
    assert page.get_by_text("OK", exact=True).is_visible()
    assert page.get_by_text(re.compile("outside the region of interest")).is_visible()
    shot(page, "10_inspect_with_roi")

    go(page, "Features")
    page.get_by_text("Embedding maps cancelled.").wait_for(timeout=180_000)
    shot(page, "10_features_cancelled")

    # Delete the deployed run: only after ticking the confirmation that says it is deployed; its model folder goes.
    go(page, "Compare")
    page.get_by_text(re.compile("although it is the deployed run")).click()
    settle(page)
    page.get_by_role("button", name="Delete run").click()
    page.get_by_text(re.compile(r"Deleted #\d+ .* and its model files")).wait_for()
    settle(page)
    shot(page, "11_compare_after_delete")
    from core.runs import RunStore
    assert RunStore(tmp_path / "workspace" / "registry.sqlite").list_runs() == []
    assert [p for p in (tmp_path / "workspace" / "models").iterdir() if p.is_dir()] == []
    assert page.outside == [], f"requests left the machine: {page.outside}"

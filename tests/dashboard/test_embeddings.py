"""Feature views of a run: real UMAP layouts, patch sampling, the coreset view, and the saved file."""
import numpy as np

from core.app import embeddings
from core.data import load_mvtec
from core.detectors import load_detector
from core.app.embeddings import compute_views, load_views, patch_box, save_views
from core.workspace import DEMO_DIR


def test_views_cover_images_patches_and_the_coreset(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, "MAX_PATCHES", 400)   # the layout is what is tested, not its size
    store, run_id = workspace["store"], workspace["run_id"]
    detector = load_detector(store.get_run(run_id)["model_path"])
    demo = load_mvtec(DEMO_DIR / "hazelnut_toy")
    few = demo[[*range(0, 28, 4), *range(28, 51, 3)]]      # 7 train and 8 test images keep it quick
    stages = []
    views = compute_views(detector, few, lambda stage, done, total: stages.append(stage))
    save_views(views, tmp_path)
    assert {"features", "layout"} <= set(stages)
    images, patches = views.images, views.patches
    assert len(images) == len(few) and np.isfinite(images[["x", "y"]].to_numpy()).all()
    assert set(images["split"]) == {"train", "test"} and images["score"].notna().all()
    assert patches["image"].nunique() == len(few) and len(patches) <= 420
    assert patches.loc[patches["defect_patch"], "defect"].ne("good").all()   # defect patches lie in defects
    assert patches.loc[patches["defect_patch"], "score"].mean() > patches.loc[patches["split"] == "train", "score"].mean()
    assert (views.bank["kind"] == "coreset").sum() == detector.memory_bank_.shape[0]
    assert np.all(np.diff(views.coverage_radii) <= 1e-6)                        # coverage only improves
    box = patch_box(views, 0, views.grid[1] - 1, (224, 160))
    assert box.shape == (224, 160) and box[0, -1] and not box[-1, 0]

    again = load_views(tmp_path)
    assert again.grid == views.grid and again.images.equals(views.images)
    assert again.patches.equals(views.patches) and again.bank.equals(views.bank)

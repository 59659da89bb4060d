"""The one-click demo: PatchCore on the bundled hazelnut set. Repeating it reuses what the first click made
(the dataset registered from the bundled folder, under whichever name, and a demo run whose model is still on
disk) instead of piling up copies."""
from __future__ import annotations

from pathlib import Path

from ..data import ImageSet, load_dataset
from ..runs import RunStore
from ..workspace import DEMO_DIR
from .uploads import register_folder

DEMO_SET = DEMO_DIR / "hazelnut_toy"
DEMO_NAME = "hazelnut_toy (demo)"
DEMO_DETECTOR = "patchcore"
DEMO_PARAMS = {"coreset_ratio": 0.05, "resize": 256}   # a few seconds on a laptop CPU, AUROC 1.0 on this set


def demo_dataset(store: RunStore) -> tuple[int, ImageSet]:
    """The registered demo set: the dataset already read from the bundled folder if there is one, else a new one."""
    folder = DEMO_SET.resolve()
    for record in store.list_datasets():
        if Path(record["source"]).resolve() == folder:
            if record["archived"]:   # asked for again: out of the archive
                store.set_archived(dataset_id=record["id"], archived=False)
            return record["id"], load_dataset(folder)
    return register_folder(store, folder, DEMO_NAME)


def demo_run(store: RunStore, dataset_id: int) -> dict | None:
    """The newest run on the demo set trained as the demo trains, whose model folder is still there."""
    return next((r for r in store.list_runs(dataset_id)
                 if r["detector"] == DEMO_DETECTOR and not r["archived"] and Path(r["model_path"]).is_dir()
                 and all(r["params"].get(k) == v for k, v in DEMO_PARAMS.items())), None)

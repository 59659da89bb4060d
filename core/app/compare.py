"""Runs of a dataset side by side: accuracy, speed, memory and size in one table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..runs import RunStore

# Files that make up a model (the rest of a model folder holds cached views of its results).
MODEL_FILES = ("config.json", "fitted.safetensors")
METRIC_COLUMNS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "f1_max": "F1-max"}


def model_size_mb(model_path: str | Path) -> float | None:
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    return sum((folder / f).stat().st_size for f in MODEL_FILES if (folder / f).is_file()) / 2**20


def run_label(run: dict) -> str:
    return f"#{run['id']} {run['name'] or run['detector']}"


def run_table(store: RunStore, dataset_id: int) -> pd.DataFrame:
    """One row per run of the dataset, newest first."""
    rows = []
    for run in store.list_runs(dataset_id):
        metrics, timings = run["metrics"] or {}, run["timings"] or {}
        rows.append({
            "run": run_label(run), "id": run["id"], "detector": run["detector"],
            "backbone": run["params"].get("backbone") or "—",
            **{label: metrics.get(key) for key, label in METRIC_COLUMNS.items()},
            "image threshold": run["thresholds"]["image"], "preset": run["thresholds"]["preset"],
            "fit s": timings.get("fit_seconds"), "ms per image": timings.get("score_ms_per_image"),
            "memory MB": timings.get("memory_mb"), "model MB": model_size_mb(run["model_path"]),
            "deployed": run["deployed"], "archived": run["archived"], "created": run["created"][:16].replace("T", " "),
        })
    return pd.DataFrame(rows)

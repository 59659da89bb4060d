"""Runs of a dataset side by side: accuracy, mistakes at each run's saved threshold, speed, memory and size in one
table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..runs import RunStore
from ..thresholds import is_anomalous

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


def mistakes_at(scores: pd.DataFrame, threshold: float | None) -> dict:
    """False alarms (good test images flagged) and missed defects (defective ones passed) of a run's registry
    scores (:meth:`core.runs.RunStore.run_scores`) at `threshold`, with how many of each kind were tested. The
    counts are None without a threshold; only labelled test images count (not the calibration's)."""
    test = scores[(scores["split"] == "test") & scores["label"].notna()]
    good, defective = test[test["label"] == 0], test[test["label"] == 1]
    if threshold is None:
        return {"false alarms": None, "missed defects": None, "good tested": len(good),
                "defective tested": len(defective)}
    return {"false alarms": int(is_anomalous(good["score"].to_numpy(), threshold).sum()),
            "missed defects": int((~is_anomalous(defective["score"].to_numpy(), threshold)).sum()),
            "good tested": len(good), "defective tested": len(defective)}


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
            **mistakes_at(store.run_scores(run["id"]), run["thresholds"]["image"]),
            "fit s": timings.get("fit_seconds"), "ms per image": timings.get("score_ms_per_image"),
            "memory MB": timings.get("memory_mb"), "model MB": model_size_mb(run["model_path"]),
            "deployed": run["deployed"], "archived": run["archived"], "created": run["created"][:16].replace("T", " "),
        })
    return pd.DataFrame(rows)

"""Renaming and deleting datasets and runs, with the files the app made for them.

The registry forgets a run or a dataset in one transaction; the files go after it. Only what the app made
is removed: a model folder inside the workspace's models folder, a dataset folder inside its datasets folder
(uploads, extracted archives). A server folder the user registered in place, or a model folder registered
from elsewhere, is the user's: it stays, and the answer says so.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline import models_dir
from ..runs import RunStore
from ..workspace import datasets_dir
from .uploads import MAX_NAME_CHARS

log = logging.getLogger(__name__)


@dataclass
class Deleted:
    """What a deletion removed: run ids, and the folders removed or (not the app's) kept."""
    runs: list[int] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve()) and path.resolve() != folder.resolve()
    except OSError:
        return False


def _remove_if_ours(path: str | Path, folder: Path, deleted: Deleted) -> None:
    path = Path(path)
    if not path.exists():
        return
    if _inside(path, folder) and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        deleted.removed.append(path)
        log.info("removed %s", path)
    else:
        deleted.kept.append(path)
        log.info("kept %s (not made by the app)", path)


def rename_dataset(store: RunStore, dataset_id: int, name: str) -> None:
    name = name.strip()
    if not name:
        raise ValueError("give the dataset a name")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a dataset name has at most {MAX_NAME_CHARS} characters ({len(name)} given)")
    store.rename_dataset(dataset_id, name)


def rename_run(store: RunStore, run_id: int, name: str) -> None:
    if len(name.strip()) > MAX_NAME_CHARS:
        raise ValueError(f"a run name has at most {MAX_NAME_CHARS} characters ({len(name.strip())} given)")
    store.rename_run(run_id, name)


def delete_run(store: RunStore, run_id: int) -> Deleted:
    """Forget the run (its inspections stay: they are the line's record) and remove its model folder."""
    deleted = Deleted(runs=[run_id])
    _remove_if_ours(store.delete_run(run_id), models_dir(), deleted)
    return deleted


def delete_dataset(store: RunStore, dataset_id: int) -> Deleted:
    """Forget the dataset and every run on it, and remove their model folders and the dataset's folder if the
    app assembled it (an upload); a server folder registered in place keeps its files."""
    record = store.get_dataset(dataset_id)
    runs = [r["id"] for r in store.list_runs(dataset_id)]
    model_paths = store.delete_dataset(dataset_id, cascade=True)
    deleted = Deleted(runs=runs)
    for path in model_paths:
        _remove_if_ours(path, models_dir(), deleted)
    _remove_if_ours(record["source"], datasets_dir(), deleted)
    return deleted

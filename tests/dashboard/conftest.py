"""One PatchCore run on the bundled demo set, trained once per session and shared read-only.

Each test gets its own copy of the registry (thresholds and deployments it saves stay its own); the model
folders are shared, so tests must not change them.
"""
import sqlite3
from pathlib import Path

import pytest

from core.app.demo import DEMO_PARAMS

from .browser_kit import app_url, page  # noqa: F401 - fixtures for the browser tests   # the demo's own settings: Home's demo reuses this run instead of training


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory):
    from core.data import load_mvtec
    from core.pipeline import register_dataset, train_run
    from core.runs import RunStore
    from core.workspace import DEMO_DIR

    home = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALYSCOPE_HOME", str(home))
        store = RunStore()
        dataset = load_mvtec(DEMO_DIR / "hazelnut_toy")
        dataset_id = register_dataset(store, dataset, "mvtec", "hazelnut_toy")
        run_id = train_run(store, dataset_id, dataset, "patchcore", DEMO_PARAMS)
    return {"home": home, "dataset_id": dataset_id, "run_id": run_id}


@pytest.fixture
def workspace(trained_home, monkeypatch, tmp_path):
    """This test's ANOMALYSCOPE_HOME, holding a private copy of the trained registry."""
    from core.runs import REGISTRY_FILENAME, RunStore

    home = tmp_path / "workspace"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("ANOMALYSCOPE_HOME", str(home))
    with sqlite3.connect(Path(trained_home["home"]) / REGISTRY_FILENAME) as src, \
            sqlite3.connect(home / REGISTRY_FILENAME) as dst:
        src.backup(dst)
    return {**trained_home, "home": home, "store": RunStore()}

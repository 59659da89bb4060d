import os
import time
from pathlib import Path

import numpy as np
import pytest

import core  # noqa: F401  (sets OMP_WAIT_POLICY before any test module loads torch)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "hazelnut_toy"
SHARED_DATASETS = Path(os.environ.get("ANOMALYSCOPE_DATASETS", REPO.parent / "shared" / "datasets"))


def shared_category(name: str) -> Path:
    """A real benchmark category from ../shared/datasets, or a clean skip when it is absent."""
    path = SHARED_DATASETS / name
    if not (path / "train").is_dir():
        pytest.skip(f"{path} not available")
    return path


def wait_until(condition, seconds: float, what: str, poll: float = 0.05) -> None:
    """Poll until condition() holds; past the deadline fail saying what never happened, instead of hanging."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(poll)


@pytest.fixture(autouse=True)
def isolated_workspace(tmp_path, monkeypatch):
    """Every test gets its own registry and model folder."""
    monkeypatch.setenv("ANOMALYSCOPE_HOME", str(tmp_path / "workspace"))


@pytest.fixture(scope="session")
def demo():
    from core.data import load_mvtec
    return load_mvtec(DEMO)


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)

"""Where user artefacts live: the run registry, model files and the datasets the app made.

The default is `data/workspace/` in the repository; `ANOMALYSCOPE_HOME` overrides it.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "data" / "demo"


def workspace_dir() -> Path:
    root = Path(os.environ.get("ANOMALYSCOPE_HOME", REPO_ROOT / "data" / "workspace"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def registrations_dir() -> Path:
    """RegAD registration files (`python -m core regad-train`), offered by name on the Train page."""
    folder = workspace_dir() / "registrations"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def datasets_dir() -> Path:
    """Datasets the app assembled: uploads, and archives named on the command line, extracted."""
    return workspace_dir() / "datasets"

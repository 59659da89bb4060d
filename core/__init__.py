"""AnomalyScope core: datasets, backbones, detectors, metrics and the run registry.

Nothing in this package imports Streamlit; the dashboard and the CLI are thin views over it.
"""


class Cancelled(Exception):
    """Raised from a progress callback to stop long work; nothing half-done is kept."""

"""AnomalyScope core: datasets, backbones, detectors, metrics and the run registry.

Nothing in this package imports Streamlit; the dashboard and the CLI are thin views over it.
"""
import os

# OpenMP threads that spin while waiting stall torch by orders of magnitude when other processes share the
# CPU (measured: one inspection 4.4 s instead of 25 ms on a busy 2-core machine). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Cancelled(Exception):
    """Raised from a progress callback to stop long work; nothing half-done is kept."""

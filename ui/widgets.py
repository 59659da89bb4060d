"""Widgets more than one page draws: a training job's progress and the run's colour legend."""
from __future__ import annotations

import re

import streamlit as st

from core.app import figures
from core.app.jobs import TrainingJob

JOB_KEY = "training_job"


def plain(text: object) -> str:
    """Text shown as typed inside Streamlit's Markdown (error messages quote user input: `__import__` must not
    turn bold, a file name's `*` must not start italics)."""
    return re.sub(r"([\\`*_\[\]<>#|~$])", r"\\\1", str(text))   # inline Markdown; messages never start a line


def start_job(job: TrainingJob, then: str | None = None) -> None:
    """Run a job for this tab; `then` is the page to open when it succeeds."""
    st.session_state[JOB_KEY] = {"job": job.start(), "then": then}


def running_job() -> dict | None:
    return st.session_state.get(JOB_KEY)


def finish_job() -> None:
    st.session_state.pop(JOB_KEY, None)


@st.fragment(run_every=1)
def job_progress() -> None:
    """One progress bar per stage and a cancel button, refreshed every second until the job ends."""
    entry = running_job()
    if entry is None:
        return
    snapshot = entry["job"].snapshot()
    if snapshot.status != "running":
        st.rerun(scope="app")   # the page shows the outcome
    st.markdown(f"**Training…** {snapshot.seconds:.0f} s")
    for stage in snapshot.stages:
        st.progress(stage.fraction, text=f"{stage.label}: {stage.done:,} of {stage.total:,}")
    if not snapshot.stages:
        st.progress(0.0, text="Loading images and the backbone…")
    if st.button("Cancel training", icon=":material/cancel:", key="cancel_training"):
        entry["job"].cancel()
        st.toast("Cancelling at the next step…")


def colour_legend(scale: tuple[float, float], image_threshold: float | None = None,
                  pixel_threshold: float | None = None, key: str = "colour_legend") -> None:
    # theme=None: Streamlit's theme would swap in its own colour scale, and the legend must match the images.
    st.plotly_chart(figures.colourbar_figure(*scale, image_threshold, pixel_threshold),
                    config={"displayModeBar": False}, key=key, theme=None)

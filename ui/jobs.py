"""The server's jobs in the dashboard: start one, draw its progress with Cancel, and list what runs on every page.

Jobs live on the registry's :class:`core.app.jobs.JobBoard` in the server process, so a reload, a page switch or
another tab finds them again (a tab's session state would lose them).
"""
from __future__ import annotations

import streamlit as st

from core.app.jobs import Job, JobBoard, JobSnapshot, job_board
from ui import state


def board() -> JobBoard:
    return job_board(state.store().path)


def start(job: Job, then: str | None = None) -> Job:
    """Start a job on the server; `then` names the page that shows its outcome (default: the job's own)."""
    return board().submit(job, then)


def training_busy() -> bool:
    """A training (or registration) is running: another would wait for the same cores."""
    return bool(board().running("training"))


def time_left(snapshot: JobSnapshot) -> str:
    if snapshot.cancelling:
        return "cancelling at the next step…"
    if snapshot.seconds_left is None:
        return f"{snapshot.seconds:.0f} s so far"
    left = snapshot.seconds_left
    return f"{snapshot.seconds:.0f} s so far, about {left:.0f} s left" if left < 90 else \
        f"{snapshot.seconds:.0f} s so far, about {left / 60:.0f} min left"


def cancel(job: Job) -> None:
    """A Cancel button's callback: callbacks run first thing in the rerun the click starts, so the click counts
    even when that rerun is cut short (the user moving on to another page at once)."""
    job.cancel()
    st.toast("Cancelling at the next step…")


def progress_panel(job: Job) -> None:
    """One progress bar per stage, the time left and Cancel, refreshed every second; the page reruns when the
    job ends so it can show the outcome."""

    @st.fragment(run_every=2)
    def panel() -> None:
        snapshot = job.snapshot()
        if not snapshot.running:
            st.rerun(scope="app")
        st.markdown(f"**{snapshot.title}…** {time_left(snapshot)}")
        for stage in snapshot.stages:
            st.progress(stage.fraction, text=f"{stage.label}: {stage.done:,} of {stage.total:,}")
        if not snapshot.stages:
            st.progress(0.0, text="Loading images and the backbone…")
        st.button("Cancel", icon=":material/cancel:", key=f"cancel_job_{job.id}", disabled=snapshot.cancelling,
                  on_click=cancel, args=(job,))

    panel()


def indicator() -> None:
    """The sidebar's list of running jobs (every page draws it): title, overall progress, time left, Cancel, and
    a link to where a finished training's outcome is. Polls only while something runs."""
    if not board().jobs():
        return

    def draw() -> None:
        jobs = board().jobs()
        running = [j for j in jobs if j.snapshot().running]
        if not running and polling:
            st.rerun(scope="app")      # the pages show what ended
        for job in running:
            snapshot = job.snapshot()
            with st.container(border=True):
                stage = snapshot.stages[-1] if snapshot.stages else None
                st.caption(f"**{snapshot.title}**  \n" + (f"{stage.label}: {stage.done:,} of {stage.total:,} · "
                                                           if stage else "") + time_left(snapshot))
                st.progress(stage.fraction if stage else 0.0)
                st.button("Cancel", key=f"sidebar_cancel_{job.id}", icon=":material/cancel:",
                          disabled=snapshot.cancelling, width="stretch", on_click=cancel, args=(job,))
        for job in jobs:
            snapshot = job.snapshot()
            if snapshot.kind == "training" and not snapshot.running and not job.seen:
                outcome = {"done": f"Run #{snapshot.run_id} is ready", "cancelled": "Training cancelled",
                           "failed": "Training failed"}[snapshot.status]
                st.page_link("app_pages/train.py", label=f"{outcome}: see it on Train", icon=":material/info:")

    polling = bool(board().running())
    with st.sidebar:
        st.fragment(draw, run_every=3 if polling else None)()

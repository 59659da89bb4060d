"""Widgets more than one page draws: text shown as typed and the run's colour legend."""
from __future__ import annotations

import re

import streamlit as st

from core.app import figures

def plain(text: object) -> str:
    """Text shown as typed inside Streamlit's Markdown (error messages quote user input: `__import__` must not
    turn bold, a file name's `*` must not start italics)."""
    return re.sub(r"([\\`*_\[\]<>#|~$])", r"\\\1", str(text))   # inline Markdown; messages never start a line


def colour_legend(scale: tuple[float, float], image_threshold: float | None = None,
                  pixel_threshold: float | None = None, key: str = "colour_legend") -> None:
    # theme=None: Streamlit's theme would swap in its own colour scale, and the legend must match the images.
    st.plotly_chart(figures.colourbar_figure(*scale, image_threshold, pixel_threshold),
                    config={"displayModeBar": False}, key=key, theme=None)

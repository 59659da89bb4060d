"""The threshold slider: its numbers follow the drag, in the browser, before Python hears of it.

A plain st.slider reports only on release, so precision, recall and the counts would lag the hand. This one is
an st.components.v2 component (inline HTML, CSS and JavaScript, served by the app itself: nothing is fetched, so
it works offline). It is given the distribution's candidate thresholds and the number of normal and anomalous
values at or above each (what :meth:`core.thresholds.ScoreDistribution.confusion` reads), so the browser does the
same binary search Python does and shows the same numbers during the drag. The position goes to Python when the
mouse is released (keys: after a short pause), as a move stamped with its time, so moving back to an earlier
position is still a move.

The input is an ``<input type="range">`` (role slider: arrows, Page Up/Down, Home and End work) with ``step="any"``
so that a preset's exact threshold is shown as is, never snapped to a step; arrows move by the step given.
"""
from __future__ import annotations

import streamlit as st

from core.thresholds import ScoreDistribution, ScoreGap

_HTML = """
<div class="threshold-slider">
  <div class="head"><span class="label"></span> <b class="value"></b></div>
  <input type="range" step="any">
  <div class="ends"><span class="low"></span><span class="gap-label"></span><span class="high"></span></div>
  <div class="live" data-testid="thresholdLive"></div>
</div>
"""

_CSS = """
.threshold-slider { font-family: var(--st-font); color: var(--st-text-color); font-size: 0.9rem; padding: 0.2rem 0; }
.head { margin-bottom: 0.3rem; } .value { color: var(--st-primary-color); }
input[type=range] { width: 100%; margin: 0; height: 1.6rem; background: transparent; cursor: pointer;
                    -webkit-appearance: none; appearance: none; }
input[type=range]::-webkit-slider-runnable-track { height: 0.4rem; border-radius: 0.2rem; background: var(--track); }
input[type=range]::-moz-range-track { height: 0.4rem; border-radius: 0.2rem; background: var(--track); }
input[type=range]::-webkit-slider-thumb { -webkit-appearance: none; width: 1.1rem; height: 1.1rem; margin-top: -0.35rem;
                                          border-radius: 50%; background: var(--st-primary-color); border: none; }
input[type=range]::-moz-range-thumb { width: 1.1rem; height: 1.1rem; border-radius: 50%; border: none;
                                      background: var(--st-primary-color); }
input[type=range]:focus-visible { outline: 2px solid var(--st-primary-color); outline-offset: 2px; }
.ends { display: flex; justify-content: space-between; font-size: 0.8rem; opacity: 0.7; }
.live { display: flex; flex-wrap: wrap; gap: 0.3rem 1.4rem; margin-top: 0.4rem; }
.live span b { font-variant-numeric: tabular-nums; }
.dragging .live b, .dragging .value { color: #ff7f0e; }
"""

_JS = """
// Python's f"{x:.4g}" (four significant digits, exponent outside 1e-4 .. 1e4)
function g4(x) {
  if (x !== 0 && (Math.abs(x) >= 1e4 || Math.abs(x) < 1e-4)) {
    return x.toExponential(3).replace(/\\.?0+e/, "e").replace(/e([+-])(\\d)$/, "e$10$2");
  }
  return String(parseFloat(x.toPrecision(4)));
}
const ratio = (a, b) => (b ? a / b : 0);

// ScoreDistribution.confusion: the first candidate threshold at or above t (bisect left)
function confusion(d, t) {
  let lo = 0, hi = d.thresholds.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (d.thresholds[mid] < t) lo = mid + 1; else hi = mid; }
  const tp = d.anomalous_at[lo], fp = d.normal_at[lo];
  const fn = d.anomalous_at[0] - tp, tn = d.normal_at[0] - fp;
  return { tp, fp, fn, tn, precision: ratio(tp, tp + fp), recall: ratio(tp, tp + fn), fpr: ratio(fp, fp + tn) };
}

export default function ({ parentElement, data, setStateValue }) {
  const root = parentElement.querySelector(".threshold-slider");
  const input = root.querySelector("input");
  let s = root.__slider;
  if (!s) {
    // The threshold is kept here, exact: the input's own value goes through the browser's decimal rounding,
    // which can move a preset that sits exactly on a score to just under it.
    s = root.__slider = { dragging: false, timer: null, data, value: data.value };
    const show = () => {
      const d = s.data, t = s.value, at = confusion(d, t);
      root.querySelector(".value").textContent = g4(t);
      input.setAttribute("aria-valuetext", g4(t));
      const n = (x) => x.toLocaleString("en-US");
      root.querySelector(".live").innerHTML = [
        ["Precision", at.precision.toFixed(3), "precision"], ["Recall", at.recall.toFixed(3), "recall"],
        ["False-positive rate", at.fpr.toFixed(3), "fpr"], [d.missed_label, n(at.fn), "fn"],
        ["False alarms", n(at.fp), "fp"]].map(([k, v, id]) => `<span>${k} <b data-live="${id}">${v}</b></span>`).join("");
    };
    const send = () => {
      clearTimeout(s.timer);
      s.timer = null;
      setStateValue("moved", { threshold: s.value, at: Date.now() });
    };
    const later = () => { clearTimeout(s.timer); s.timer = setTimeout(send, 250); };
    input.addEventListener("input", () => { s.value = input.valueAsNumber; show(); });
    input.addEventListener("pointerdown", () => { s.dragging = true; root.classList.add("dragging"); });
    const release = () => { s.dragging = false; root.classList.remove("dragging"); };
    // "change" comes once, when the mouse lets go of a moved thumb; a click without a move only releases.
    input.addEventListener("change", () => { release(); send(); });
    window.addEventListener("pointerup", release);
    s.cleanup = () => { window.removeEventListener("pointerup", release); clearTimeout(s.timer); };
    input.addEventListener("keydown", (e) => {
      const d = s.data, steps = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1, PageDown: -10, PageUp: 10 };
      let t = s.value;
      if (e.key in steps) t += steps[e.key] * d.step;
      else if (e.key === "Home") t = d.min;
      else if (e.key === "End") t = d.max;
      else return;
      e.preventDefault();
      s.value = Math.min(d.max, Math.max(d.min, t));
      input.value = String(s.value);
      show();
      later();
    });
    s.show = show;
  }
  s.data = data;
  root.querySelector(".label").textContent = data.label;
  input.setAttribute("aria-label", data.label);
  input.min = String(data.min);
  input.max = String(data.max);
  root.querySelector(".low").textContent = g4(data.min);
  root.querySelector(".high").textContent = g4(data.max);
  root.querySelector(".gap-label").textContent = data.gap_label;
  root.style.setProperty("--track", data.track);
  if (!s.dragging && s.timer === null) {                 // Python's threshold, unless the user is mid-move
    s.value = data.value;
    input.value = String(data.value);
  }
  s.show();
  return s.cleanup;
}
"""

_component = st.components.v2.component("anomalyscope_threshold_slider", html=_HTML, css=_CSS, js=_JS)

GAP_COLOUR, OVERLAP_COLOUR, TRACK_COLOUR = "#2ca02c", "#d62728", "rgba(128, 128, 128, 0.3)"


def take_move(key: str) -> float | None:
    """The threshold the user moved the slider `key` to since the last call, or None. Call it before drawing the
    slider, so that the slider is drawn at the new value."""
    moved = (st.session_state.get(key) or {}).get("moved")
    seen = f"{key}_seen_move"
    if not moved or moved.get("at") == st.session_state.get(seen):
        return None
    st.session_state[seen] = moved.get("at")
    return float(moved["threshold"])


def _track(low: float, high: float, gap: ScoreGap | None) -> str:
    """The track's background: the gap between good and defective scores in green, their overlap in red."""
    if gap is None:
        return TRACK_COLOUR
    a, b = sorted((gap.highest_normal, gap.lowest_anomalous))
    left, right = (100 * (min(max(x, low), high) - low) / (high - low) for x in (a, b))
    colour = GAP_COLOUR if gap.separated else OVERLAP_COLOUR
    return (f"linear-gradient(to right, {TRACK_COLOUR} {left:.2f}%, {colour} {left:.2f}%, {colour} {right:.2f}%, "
            f"{TRACK_COLOUR} {right:.2f}%)")


def threshold_slider(key: str, label: str, dist: ScoreDistribution, value: float, low: float, high: float,
                     step: float, missed_label: str) -> None:
    """Draw the slider at `value` over [low, high]; read the user's moves with :func:`take_move`."""
    gap = dist.gap() if dist.has_both_classes else None
    _component(key=key, data={
        "label": label, "value": value, "min": low, "max": high, "step": step, "missed_label": missed_label,
        "thresholds": dist.thresholds.tolist(), "anomalous_at": dist.n_anomalous_at.tolist(),
        "normal_at": dist.n_normal_at.tolist(), "track": _track(low, high, gap),
        "gap_label": "" if gap is None else ("green: the gap between good and defective scores" if gap.separated
                                             else "red: good and defective scores overlap")})

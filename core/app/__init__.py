"""The application layer: what the dashboard and the command line build on the engine.

Figures, heatmap renders and the HTML report, feature views, the run comparison, live inspection, dataset
uploads and the background training job. Modules here import the engine (core.data, core.detectors,
core.pipeline, ...), never the other way round, and never Streamlit: that stays in ui/ and pages/.
"""

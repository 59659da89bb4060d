"""AnomalyScope dashboard: the frame around the pages (navigation and the shared sidebar selectors).

Run with `make run` or `streamlit run app.py`. The pages are in app_pages/ (ui/__init__.py says why not pages/).
"""
from pathlib import Path

import streamlit as st

from ui import jobs, state

# A bundled image, served by the app itself: a :material/...: page icon makes the browser fetch the tab icon from
# fonts.gstatic.com, and inspection PCs are often offline (the icons inside the pages come with Streamlit's font).
st.set_page_config(page_title="AnomalyScope", page_icon=str(Path(__file__).parent / "ui" / "icon.png"), layout="wide")

PAGES = {
    "": [st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True)],
    "Build": [st.Page("app_pages/datasets.py", title="Datasets", icon=":material/photo_library:"),
              st.Page("app_pages/train.py", title="Train", icon=":material/model_training:")],
    "Analyse": [st.Page("app_pages/thresholds.py", title="Thresholds", icon=":material/tune:"),
                st.Page("app_pages/heatmaps.py", title="Heatmaps", icon=":material/local_fire_department:"),
                st.Page("app_pages/features.py", title="Features", icon=":material/scatter_plot:"),
                st.Page("app_pages/compare.py", title="Compare", icon=":material/leaderboard:")],
    "Demo": [st.Page("app_pages/inspect_live.py", title="Inspect", icon=":material/verified:", url_path="inspect")],
}

page = st.navigation(PAGES)
state.sidebar()
jobs.indicator()
page.run()

"""Why the pages live in app_pages/ and not pages/ (see ui/__init__.py): the same st.navigation app, with
its pages in either folder, driven by AppTest. With pages/, a rerun of a page leaves app.py's frame out."""
import textwrap

import pytest
from streamlit.testing.v1 import AppTest

FRAME = """
import streamlit as st
st.session_state["frame"] = st.session_state.get("frame", 0) + 1
page = st.navigation([st.Page("{folder}/first.py", default=True), st.Page("{folder}/second.py")])
page.run()
"""
SECOND = """
import streamlit as st
st.session_state["frame_runs_seen"] = st.session_state.get("frame_runs_seen", []) + [st.session_state.get("frame")]
st.button("again")
"""


def app_with_pages_in(root, folder: str) -> AppTest:
    (root / folder).mkdir(parents=True)
    (root / "app.py").write_text(textwrap.dedent(FRAME.format(folder=folder)))
    (root / folder / "first.py").write_text("import streamlit as st\nst.write('first')\n")
    (root / folder / "second.py").write_text(textwrap.dedent(SECOND))
    return AppTest.from_file(str(root / "app.py"), default_timeout=30)


@pytest.mark.parametrize("folder, frame_runs_on_rerun", [("app_pages", True), ("pages", False)])
def test_a_rerun_of_a_page_runs_the_frame_only_outside_a_pages_folder(tmp_path, folder, frame_runs_on_rerun):
    at = app_with_pages_in(tmp_path, folder)
    at.run()
    at.switch_page(f"{folder}/second.py").run()
    frame_runs = at.session_state["frame"]
    at.button[0].click().run()                  # a widget on the page: the rerun every click makes
    assert not at.exception
    assert (at.session_state["frame"] > frame_runs) is frame_runs_on_rerun
    # If Streamlit's pages/ detection ever stops overriding st.navigation here, the "pages" case fails:
    # then the folder can be renamed to pages/ as the product layout names it.

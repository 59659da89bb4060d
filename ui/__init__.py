"""Streamlit helpers shared by the dashboard's pages.

The pages live in app_pages/, not pages/. Streamlit's documentation says an app that calls st.navigation
ignores a pages/ folder, but Streamlit 1.67 still finds it when the server (or AppTest) starts and falls back
to its older automatic multipage mode: in a real browser a page's own URL (/second) runs that page file
alone, without app.py's frame and sidebar, and the navigation lists "app" as a page; AppTest does the same on
every rerun of a page. tests/dashboard/test_page_folder.py shows it on a two-page app with either folder.
"""

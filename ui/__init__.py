"""Streamlit helpers shared by the dashboard's pages.

The pages live in app_pages/, not pages/: a folder named pages/ next to app.py switches Streamlit into its
older automatic multipage mode, which runs page files on their own, without app.py's frame and sidebar
(AppTest does so on every run).
"""

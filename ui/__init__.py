"""Streamlit helpers shared by the dashboard's pages (the pages themselves live in pages/)."""

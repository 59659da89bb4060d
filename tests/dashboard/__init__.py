"""Tests of the dashboard and the core modules behind it (a package, so its conftest does not shadow tests/conftest.py)."""

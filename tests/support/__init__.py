"""Shared test helpers: fakes with real behaviour (no mocks), and pytest plugins (docker.py)."""

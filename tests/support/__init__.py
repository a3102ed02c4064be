"""Shared test helpers: fakes with real behaviour (no mocks)."""

"""Test support shared across test folders: pytest plugins, helpers, fakes with real behaviour
(no mocks)."""

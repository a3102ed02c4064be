"""Test support shared across test folders: pytest plugins, fakes with real behaviour."""

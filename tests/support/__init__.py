"""Test support shared across test folders (pytest plugins and helpers)."""

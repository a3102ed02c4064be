"""Plugins for every test folder: Docker fixtures (used by tests/container and others)."""

pytest_plugins = ["tests.support.docker"]

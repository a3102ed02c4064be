"""Plugins for every test folder: Docker fixtures (used by tests/container and others), and the
hypothesis profiles the fuzz tests run under.

`default`: few examples, so that every fuzz test together stays within seconds of the normal
run. `fuzz` (`FUZZ=1` in the environment, or `--hypothesis-profile=fuzz`): thousands of examples
per test, for when a parser or a boundary changes; property tests then run without the
per-test timeout, which is sized for the normal run.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.support.docker"]

settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("fuzz" if os.environ.get("FUZZ") == "1" else "default")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    fuzzing = os.environ.get("FUZZ") == "1" or config.getoption("hypothesis_profile") == "fuzz"
    if not fuzzing:
        return
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.timeout(0))

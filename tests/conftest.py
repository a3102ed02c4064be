"""Plugins for every test folder: Docker fixtures (used by tests/container and others), and the
hypothesis profiles the fuzz tests run under.

`default`: few examples, so that every fuzz test together stays within seconds of the normal
run. `fuzz` (`--hypothesis-profile=fuzz`, or `FUZZ=1` in the environment): a long run, for
when a parser or a boundary changes.
"""

import os

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

"""The crash-loop breaker's state transitions (pure) and their `state.json` form: one crash
is retried, a second one of the same release refuses it."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from agent.releases.state import ModelRecord, ModelRef, RolledBack, StoreState
from wire.reasons import Reason

AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
V1 = ModelRef(1, "1" * 64)
V2 = ModelRef(2, "2" * 64)


def _state(**record: object) -> StoreState:
    return StoreState({"m": ModelRecord(**record)})  # type: ignore[arg-type]


CRASHED_V2 = RolledBack(2, V2.sha256, Reason.CRASHED_DURING_INSTALL, AT)
CRASHED_V1 = RolledBack(1, V1.sha256, Reason.CRASHED_DURING_INSTALL, AT)
V2_OTHER_BASELINE = ModelRef(2, V2.sha256, "b" * 64)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # First crash loading v2 (never switched): v1 still serves, v2 may be retried once.
        (
            {"active": V1, "highest_seen": V2, "installing": V2},
            {"active": V1, "highest_seen": V2, "crashed_once": V2},
        ),
        # First crash while v2 was on trial: back to v1 (still known good), v2 retried once.
        (
            {"active": V2, "last_known_good": V1, "highest_seen": V2, "installing": V2},
            {"active": V1, "last_known_good": V1, "highest_seen": V2, "crashed_once": V2},
        ),
        # The first release ever crashed once: nothing to serve, retried when offered.
        (
            {"active": V1, "highest_seen": V1, "installing": V1},
            {"highest_seen": V1, "crashed_once": V1},
        ),
        # Second crash loading v2: refused from now on.
        (
            {"active": V1, "highest_seen": V2, "installing": V2, "crashed_once": V2},
            {"active": V1, "highest_seen": V2, "rolled_back": CRASHED_V2},
        ),
        # Second crash while v2 was on trial: back to v1, v2 refused.
        (
            {"active": V2, "last_known_good": V1, "highest_seen": V2, "installing": V2,
             "crashed_once": V2},
            {"active": V1, "last_known_good": V1, "highest_seen": V2, "rolled_back": CRASHED_V2},
        ),
        # Second crash of the first release ever: nothing to serve, refused.
        (
            {"active": V1, "highest_seen": V1, "installing": V1, "crashed_once": V1},
            {"highest_seen": V1, "rolled_back": CRASHED_V1},
        ),
        # The same release with another baseline ref is still the same release: blocked.
        (
            {"active": V1, "highest_seen": V2, "installing": V2_OTHER_BASELINE,
             "crashed_once": V2},
            {"active": V1, "highest_seen": V2, "rolled_back": CRASHED_V2},
        ),
        # A crash of v1 once says nothing about v2: v2's crash is its first.
        (
            {"active": V1, "highest_seen": V2, "installing": V2, "crashed_once": V1},
            {"active": V1, "highest_seen": V2, "crashed_once": V2},
        ),
        # Nothing was being installed: nothing changes, a remembered crash included.
        ({"active": V1, "highest_seen": V1}, {"active": V1, "highest_seen": V1}),
        (
            {"active": V1, "highest_seen": V2, "crashed_once": V2},
            {"active": V1, "highest_seen": V2, "crashed_once": V2},
        ),
    ],
)  # fmt: skip
def test_crash_recovered(before: dict[str, object], after: dict[str, object]) -> None:
    assert _state(**before).crash_recovered("m", AT).record("m") == ModelRecord(**after)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("transition", "left"),
    [
        # The retry starts: the crash is remembered under the same guard.
        (lambda s: s.installing("m", V2), V2),
        # Another release starts instead: the old crash no longer matters.
        (lambda s: s.installing("m", ModelRef(3, "3" * 64)), None),
        # The retry served its first requests (or failed cleanly): forgiven.
        (lambda s: s.installing("m", V2).installed("m", V2), None),
        # Rolled back (probation) or removed: nothing left to retry.
        (lambda s: s.rolled_back("m", Reason.PROBATION_ERRORS, AT), None),
        (lambda s: s.removed("m"), None),
    ],
)
def test_the_remembered_crash_follows_the_release_retried(
    transition: Callable[[StoreState], StoreState], left: ModelRef | None
) -> None:
    state = _state(active=V2, last_known_good=V1, highest_seen=V2, crashed_once=V2)
    assert transition(state).record("m").crashed_once == left


def test_one_crash_then_a_clean_retry_then_a_crash_is_a_first_crash_again() -> None:
    """Forgiven once through its trial, a release starts with a clean slate."""
    state = _state(active=V1, highest_seen=V2, installing=V2)
    state = state.crash_recovered("m", AT).installing("m", V2).installed("m", V2)
    state = state.installing("m", V2).crash_recovered("m", AT)
    assert state.record("m").crashed_once == V2
    assert state.record("m").rolled_back is None


@pytest.mark.parametrize(
    ("installing", "cleared", "left"),
    [(V2, V2, None), (V2, V1, V2), (None, V2, None)],  # only the release on trial clears it
)
def test_installed_clears_only_its_own_record(
    installing: ModelRef | None, cleared: ModelRef, left: ModelRef | None
) -> None:
    state = _state(active=V1, installing=installing).installed("m", cleared)
    assert state.record("m").installing == left


def test_a_rollback_ends_the_trial_and_a_higher_version_lifts_a_refusal() -> None:
    state = _state(active=V2, last_known_good=V1, highest_seen=V2, installing=V2)
    assert state.rolled_back("m", Reason.PROBATION_ERRORS, AT).record("m").installing is None
    refused = _state(active=V1, highest_seen=V2).refused("m", V2, Reason.RESOURCE_LIMIT, AT)
    assert refused.record("m").rolled_back == RolledBack(2, V2.sha256, Reason.RESOURCE_LIMIT, AT)
    v3 = ModelRef(3, "3" * 64)
    assert refused.seen("m", v3).record("m").rolled_back is None


def test_installing_is_written_only_when_set_and_reads_back() -> None:
    plain = json.loads(json.dumps(_state(active=V1).to_json()))
    assert "installing" not in plain["models"]["m"]
    assert "crashed_once" not in plain["models"]["m"]
    state = _state(active=V1, installing=V2, crashed_once=V2)
    document = json.dumps(state.to_json()).encode()
    assert StoreState.from_json_bytes(document) == state

"""The crash-loop breaker's state transitions (pure) and their `state.json` form."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from agent.releases.store import ModelRecord, ModelRef, RolledBack, StoreState
from wire.reasons import Reason

AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
V1 = ModelRef(1, "1" * 64)
V2 = ModelRef(2, "2" * 64)


def _state(**record: object) -> StoreState:
    return StoreState({"m": ModelRecord(**record)})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # Died loading v2 (never switched): v1 still serves, v2 refused.
        (
            {"active": V1, "highest_seen": V2, "installing": V2},
            {"active": V1, "highest_seen": V2, "rolled_back": RolledBack(2, V2.sha256,
             Reason.CRASHED_DURING_INSTALL, AT)},
        ),
        # Died while v2 was on trial: back to v1, v2 refused, no fallback left.
        (
            {"active": V2, "last_known_good": V1, "highest_seen": V2, "installing": V2},
            {"active": V1, "highest_seen": V2, "rolled_back": RolledBack(2, V2.sha256,
             Reason.CRASHED_DURING_INSTALL, AT)},
        ),
        # The first release ever crashed: nothing to serve, still refused.
        (
            {"active": V1, "highest_seen": V1, "installing": V1},
            {"highest_seen": V1, "rolled_back": RolledBack(1, V1.sha256,
             Reason.CRASHED_DURING_INSTALL, AT)},
        ),
        # Nothing was being installed: nothing changes.
        ({"active": V1, "highest_seen": V1}, {"active": V1, "highest_seen": V1}),
    ],
)  # fmt: skip
def test_crash_recovered(before: dict[str, object], after: dict[str, object]) -> None:
    assert _state(**before).crash_recovered("m", AT).record("m") == ModelRecord(**after)  # type: ignore[arg-type]


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
    state = _state(active=V1, installing=V2)
    document = json.dumps(state.to_json()).encode()
    assert StoreState.from_json_bytes(document) == state

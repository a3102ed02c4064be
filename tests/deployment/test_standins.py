"""The agent stand-ins merge desired patches with the hub's own merge patch, like the agent."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from simulator import standins
from simulator.standins import StandIn
from simulator.twins import merge_patch
from wire.reasons import Reason
from wire.reported import ModelEntry, read_entry, to_twin


@pytest.mark.parametrize(
    ("target", "patch", "merged"),
    [
        ({}, {"models": {"m": {"version": 1}}}, {"models": {"m": {"version": 1}}}),
        (
            {"models": {"m": {"version": 1, "sha256": "a"}}},
            {"models": {"m": {"version": 2}}},
            {"models": {"m": {"version": 2, "sha256": "a"}}},
        ),
        (
            {"models": {"m": {"v": 1}, "n": {"v": 1}}},
            {"models": {"n": None}},
            {"models": {"m": {"v": 1}}},
        ),
        ({"a": {"b": 1}}, {"a": [1, 2]}, {"a": [1, 2]}),
        ({"a": 1}, {"$version": 4}, {"a": 1, "$version": 4}),
    ],
)
def test_merge_patch(target: dict[str, Any], patch: dict[str, Any], merged: dict[str, Any]) -> None:
    assert merge_patch(target, patch) == merged


@dataclass
class RecordingStandIn(StandIn):
    """Keeps what it would publish instead of sending it."""

    sent: list[dict[str, Any]] = field(default_factory=list)

    def _publish(self, topic: str, body: Mapping[str, Any] | None) -> None:
        self.sent.append(dict(body or {}))


async def test_a_model_leaving_the_desired_state_loses_its_entry_and_may_come_back() -> None:
    stand_in = RecordingStandIn("d", "mlagent", probation_s=0.01, failing=(), check=None)
    sent = stand_in.sent
    manifest = {"version": 2, "sha256": "a" * 64}
    stand_in.on_desired({"models": {"m": manifest, "n": manifest}})
    stand_in.on_desired({"models": {"m": manifest}})
    assert sent[-1] == {"models": {"n": None}}
    await asyncio.sleep(0.05)  # n's probation ends after its removal: no entry comes back
    assert all("n" not in patch["models"] for patch in sent[3:])
    stand_in.on_desired({"models": {"m": manifest, "n": manifest}})  # the same release again
    assert sent[-1]["models"]["n"]["state"] == "active"
    before = len(sent)
    stand_in.on_desired({"models": {"m": manifest, "n": {"version": 1, "sha256": "b" * 64}}})
    assert sent[before:] == []  # older than what was seen: nothing to report


def test_the_stand_ins_report_only_reasons_the_agent_has() -> None:
    assert {Reason(reason) for reason in standins.REASONS} <= set(Reason)


async def test_a_stand_in_reports_what_the_wire_reads_back() -> None:
    """Every entry a stand-in sends reads back through the wire's reader, nothing dropped."""
    stand_in = RecordingStandIn("d", "mlagent", probation_s=0.01, failing=("b" * 64,), check=None)
    stand_in.on_desired({"models": {"m": {"version": 1, "sha256": "a" * 64}}})
    await asyncio.sleep(0.05)
    stand_in.on_desired({"models": {"m": {"version": 2, "sha256": "b" * 64}}})
    await asyncio.sleep(0.05)
    stand_in.on_method("rollback", "1", {"model": "m"})
    entries = [patch["models"]["m"] for patch in stand_in.sent if "models" in patch]
    states = [(e["state"], (e.get("probation") or {}).get("state")) for e in entries]
    assert states == [
        ("active", "watching"),
        ("active", "passed"),
        ("active", "watching"),
        ("rolled_back", "failed"),
        ("rolled_back", None),
    ]
    for entry in entries:
        read = read_entry(entry, ModelEntry)
        assert read is not None
        assert to_twin(read) == entry


@pytest.mark.parametrize(
    ("quiet", "state", "requests"),
    [((), "passed", 200), (("a" * 64,), "passed_without_traffic", 0)],
)
async def test_a_probation_ends_passed_or_without_traffic_as_the_agent_does(
    quiet: tuple[str, ...], state: str, requests: int
) -> None:
    stand_in = RecordingStandIn("d", "m", probation_s=0.01, failing=(), check=None, quiet=quiet)
    stand_in.on_desired({"models": {"m": {"version": 2, "sha256": "a" * 64}}})
    await asyncio.sleep(0.05)
    ended = stand_in.sent[-1]["models"]["m"]
    assert (ended["state"], ended["probation"]["state"]) == ("active", state)
    assert ended["probation"]["requests"] == requests

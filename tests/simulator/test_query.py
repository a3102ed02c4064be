"""Twin queries over service-shaped twin documents."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from simulator.query import Cursors, QueryError, page, parse_query, select

TWINS: list[Mapping[str, object]] = [
    {
        "deviceId": "d1",
        "moduleId": "ml",
        "tags": {"ring": "canary", "site": {"country": "FR"}},
        "configurations": {"ring-1.a": {"status": "Applied"}},
        "properties": {
            "desired": {"model": {"version": 3}, "$version": 4},
            "reported": {"model": {"version": 3, "state": "active"}, "$version": 9},
        },
    },
    {
        "deviceId": "d2",
        "moduleId": "ml",
        "tags": {"ring": "broad"},
        "properties": {
            "desired": {"model": {"version": 3}, "$version": 2},
            "reported": {"model": {"version": 2, "state": "failed"}, "$version": 5},
        },
    },
    {"deviceId": "d2", "tags": {}, "properties": {"desired": {}, "reported": {}}},
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT * FROM devices.modules", ["d1", "d2"]),
        ("select * from devices.modules where tags.ring = 'canary'", ["d1"]),
        ("SELECT * FROM devices.modules WHERE tags.site.country = 'FR'", ["d1"]),
        (
            "SELECT * FROM devices.modules WHERE properties.reported.model.version "
            "< properties.desired.model.version",
            ["d2"],
        ),
        (
            "SELECT * FROM devices.modules WHERE properties.reported.model.state = 'failed' "
            "OR tags.ring = 'canary'",
            ["d1", "d2"],
        ),
        ("SELECT * FROM devices.modules WHERE deviceId = 'd2' AND moduleId = 'ml'", ["d2"]),
        ("SELECT * FROM devices.modules WHERE properties.desired.$version > 3", ["d1"]),
        ("SELECT * FROM devices.modules WHERE tags.missing = 1", []),
        ("SELECT * FROM devices.modules WHERE tags.site = 'FR'", []),  # objects do not compare
        ("SELECT * FROM devices", ["d2"]),
        ("SELECT * FROM devices.modules WHERE tags.ring IN ['broad', 'x']", ["d2"]),
        ("SELECT * FROM devices.modules WHERE tags.ring in ('canary')", ["d1"]),
        ("SELECT * FROM devices.modules WHERE tags.ring NIN ['canary']", ["d2"]),
        ("SELECT * FROM devices.modules WHERE tags.missing NIN ['canary']", []),
        ("SELECT * FROM devices.modules WHERE STARTSWITH(tags.ring, 'can')", ["d1"]),
        ("SELECT * FROM devices.modules WHERE ENDSWITH(tags.ring, 'oad')", ["d2"]),
        ("SELECT * FROM devices.modules WHERE STARTSWITH(tags.missing, 'c')", []),
        ("SELECT * FROM devices.modules WHERE NOT IS_DEFINED(tags.site)", ["d2"]),
        (
            "SELECT * FROM devices.modules WHERE configurations.[[ring-1.a]].status = 'Applied'",
            ["d1"],
        ),
    ],
)
def test_queries_select_twins(text: str, expected: list[str]) -> None:
    assert [twin["deviceId"] for twin in select(parse_query(text), TWINS)] == expected


@pytest.mark.parametrize(
    "text",
    [
        "SELECT FROM devices.modules",
        "SELECT deviceId, FROM devices.modules",
        "SELECT COUNT(deviceId) FROM devices",
        "SELECT * FROM devices.jobs",
        "SELECT * FROM devices WHERE tags.ring IN ['a'",
        "SELECT * FROM devices WHERE STARTSWITH(deviceId)",
        "SELECT * FROM devices.modules WHERE",
        "SELECT * FROM devices.modules WHERE tags.a = = 1",
        "DELETE FROM devices",
    ],
)
def test_unsupported_queries_are_refused(text: str) -> None:
    with pytest.raises(QueryError):
        parse_query(text)


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("SELECT COUNT() FROM devices.modules", [{"numberOfDevices": 2}]),
        ("SELECT COUNT() AS n FROM devices.modules WHERE tags.ring = 'canary'", [{"n": 1}]),
        (
            "SELECT deviceId, properties.reported.model.state AS state FROM devices.modules",
            [{"deviceId": "d1", "state": "active"}, {"deviceId": "d2", "state": "failed"}],
        ),
        (
            "SELECT deviceId, tags.site.country FROM devices.modules",
            [{"deviceId": "d1", "country": "FR"}, {"deviceId": "d2"}],
        ),
    ],
)
def test_projections_and_counts(text: str, rows: list[dict[str, object]]) -> None:
    assert select(parse_query(text), TWINS) == rows


def test_pages_follow_continuation_tokens() -> None:
    items: list[Mapping[str, object]] = [{"n": n} for n in range(5)]
    first, token = page(items, None, 2)
    second, token2 = page(items, token, 2)
    third, token3 = page(items, token2, 2)
    assert [first, second, third] == [items[0:2], items[2:4], items[4:5]]
    assert token3 is None


@pytest.mark.parametrize(("continuation", "size"), [("x", 2), ("-1", 2), (None, 0)])
def test_bad_continuation_or_page_size_is_refused(continuation: str | None, size: int) -> None:
    with pytest.raises(QueryError):
        page([], continuation, size)


def test_cursors_page_a_snapshot_and_reselect_a_forgotten_one() -> None:
    selections: list[int] = []
    fleet: list[Mapping[str, object]] = [{"n": n} for n in range(5)]

    def select_rows() -> list[Mapping[str, object]]:
        selections.append(1)
        return list(fleet)

    cursors = Cursors(keep=1)
    first, token = cursors.page(select_rows, None, 2)
    fleet.append({"n": 5})  # a change after the first page is not in this cursor's pages
    second, token2 = cursors.page(select_rows, token, 2)
    third, token3 = cursors.page(select_rows, token2, 2)
    assert [*first, *second, *third] == [{"n": n} for n in range(5)]
    assert (token3, len(selections)) == (None, 1)
    _, other = cursors.page(select_rows, None, 2)  # a second query: the first is forgotten
    _, again = cursors.page(select_rows, None, 2)
    assert other is not None
    assert again is not None
    cursors.page(select_rows, other, 2)
    assert len(selections) == 4


@pytest.mark.parametrize("token", ["x", "1", "a.2", "1.x", "1.-2"])
def test_bad_cursor_tokens_are_refused(token: str) -> None:
    with pytest.raises(QueryError):
        Cursors().page(list, token, 2)

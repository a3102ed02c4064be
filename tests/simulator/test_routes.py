"""edgeHub routes: parsing the manifest forms and choosing sinks, WHERE clauses included."""

from __future__ import annotations

import pytest

from simulator import expressions
from simulator.routes import (
    ModuleInput,
    RouteError,
    Source,
    Upstream,
    parse_route,
    parse_routes,
    route_matches,
    sinks_for,
)
from simulator.topics import Message


def _message(module: str = "cam", output: str | None = "out", **properties: str) -> Message:
    system = {"connectionDeviceId": "dev", "connectionModuleId": module}
    if output is not None:
        system["outputName"] = output
    return Message(b"{}", {**system, "contentType": "application/json"}, properties)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/*", Source()),
        ("/messages", Source()),
        ("/messages/*", Source()),
        ("/messages/modules/*", Source()),
        ("/messages/modules/cam", Source(module="cam")),
        ("/messages/modules/cam/*", Source(module="cam")),
        ("/messages/modules/cam/outputs/*", Source(module="cam", needs_output=True)),
        ("/messages/modules/cam/outputs/out", Source("cam", "out", needs_output=True)),
        ("/twinChangeNotifications", Source(twin_changes=True)),
    ],
)
def test_sources_parse(source: str, expected: Source) -> None:
    assert parse_route("r", f"FROM {source} INTO $upstream").source == expected


@pytest.mark.parametrize(
    ("sink", "expected"),
    [
        ("$upstream", Upstream()),
        ('BrokeredEndpoint("/modules/ml/inputs/infer")', ModuleInput("ml", "infer")),
        ("brokeredendpoint('/modules/ml/inputs/infer')", ModuleInput("ml", "infer")),
        ('BrokeredEndpoint( "/modules/ml/inputs/infer" )', ModuleInput("ml", "infer")),
    ],
)
def test_sinks_parse(sink: str, expected: object) -> None:
    assert parse_route("r", f"FROM /messages/* INTO {sink}").sink == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FROM /messages/*",
        "SELECT * INTO $upstream",
        "FROM /messages/modules/a/outputs/b/c INTO $upstream",
        "FROM /messages/* INTO $downstream",
        'FROM /messages/* INTO BrokeredEndpoint("/modules/a/outputs/b")',
        "FROM /messages/* WHERE a = INTO $upstream",
        "FROM /messages/* WHERE (a = 1 INTO $upstream",
    ],
)
def test_unsupported_routes_are_refused(text: str) -> None:
    with pytest.raises(RouteError):
        parse_route("bad", text)


@pytest.mark.parametrize(
    ("source", "message", "expected"),
    [
        ("/messages/*", _message(), True),
        ("/messages/*", _message(output=None), True),
        ("/messages/modules/cam/outputs/out", _message(), True),
        ("/messages/modules/cam/outputs/out", _message(output="other"), False),
        ("/messages/modules/cam/outputs/out", _message(module="other"), False),
        ("/messages/modules/cam/outputs/*", _message(output=None), False),
        ("/messages/modules/cam/outputs/*", _message(output="any"), True),
        ("/messages/modules/cam/*", _message(output=None), True),
        ("/twinChangeNotifications", _message(), False),
    ],
)
def test_sources_select_messages(source: str, message: Message, expected: bool) -> None:
    assert route_matches(parse_route("r", f"FROM {source} INTO $upstream"), message) is expected


@pytest.mark.parametrize(
    ("where", "properties", "expected"),
    [
        ("severity = 'high'", {"severity": "high"}, True),
        ("severity = 'high'", {"severity": "low"}, False),
        ("severity = 'high'", {}, False),
        ("severity != 'high'", {}, False),  # undefined, not true
        ("severity <> 'high'", {"severity": "low"}, True),
        ("level > 3", {"level": "4"}, True),
        ("level > 3", {"level": "10"}, True),  # numbers, not strings
        ("level > 3", {"level": "three"}, False),
        ("level <= 3.5", {"level": "3.5"}, True),
        ("level >= -1", {"level": "-2"}, False),
        ("a = 'x' AND b = 'y'", {"a": "x", "b": "y"}, True),
        ("a = 'x' AND b = 'y'", {"a": "x"}, False),
        ("a = 'x' OR b = 'y'", {"b": "y"}, True),
        ("NOT a = 'x'", {"a": "y"}, True),
        ("NOT (a = 'x' OR b = 'y')", {"a": "z", "b": "z"}, True),
        ("(a = 'x' OR a = 'y') AND NOT b = 'z'", {"a": "y", "b": "w"}, True),
        ("a = 'it''s'", {"a": "it's"}, True),
        ('a = "dq"', {"a": "dq"}, True),
        ("$contentType = 'application/json'", {}, True),
        ("$connectionModuleId = 'cam'", {}, True),
        ("$outputName = 'out' and schema = 'v2'", {"schema": "v2"}, True),
        ("IS_DEFINED(schema)", {"schema": ""}, True),
        ("NOT IS_DEFINED(schema)", {}, True),
        ("a = true", {"a": "true"}, False),  # a string is not a boolean
    ],
)
def test_where_clauses_filter_messages(
    where: str, properties: dict[str, str], expected: bool
) -> None:
    route = parse_route("r", f"FROM /messages/* WHERE {where} INTO $upstream")
    assert route_matches(route, _message(**properties)) is expected


def test_route_objects_carry_priority_and_ttl() -> None:
    (route,) = parse_routes(
        {"r": {"route": "FROM /messages/* INTO $upstream", "priority": 2, "timeToLiveSecs": 60}}
    )
    assert (route.priority, route.ttl_seconds) == (2, 60)


@pytest.mark.parametrize(
    "spec", [42, {"priority": 1}, {"route": "FROM /messages/* INTO $upstream", "priority": "hi"}]
)
def test_malformed_route_objects_are_refused(spec: object) -> None:
    with pytest.raises(RouteError):
        parse_routes({"r": spec})


def test_each_sink_gets_a_message_once_however_many_routes_lead_there() -> None:
    routes = parse_routes(
        {
            "all": "FROM /messages/* INTO $upstream",
            "cam": "FROM /messages/modules/cam/* INTO $upstream",
            "ml": "FROM /messages/modules/cam/outputs/out "
            'INTO BrokeredEndpoint("/modules/ml/inputs/in")',
            "never": 'FROM /messages/modules/x/* INTO BrokeredEndpoint("/modules/y/inputs/in")',
        }
    )
    assert sinks_for(routes, _message()) == (Upstream(), ModuleInput("ml", "in"))


def test_expression_errors_name_the_problem() -> None:
    with pytest.raises(expressions.ExpressionError, match="expected a comparison"):
        expressions.parse("a AND b")

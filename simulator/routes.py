"""edgeHub routes: parse `FROM ... [WHERE ...] INTO ...` and pick the sinks for a message (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from simulator import expressions
from simulator.topics import Message

DEFAULT_TTL_SECONDS = 7200  # edgeHub's storeAndForwardConfiguration default


class RouteError(ValueError):
    """A route edgeHub would refuse to load."""


@dataclass(frozen=True)
class Source:
    """Which messages a route takes: `None` means any module / any output."""

    module: str | None = None
    output: str | None = None
    needs_output: bool = False
    twin_changes: bool = False  # `/twinChangeNotifications`: parsed, never matched by a message

    def accepts(self, module: str | None, output: str | None) -> bool:
        if self.twin_changes:
            return False
        if self.module is not None and module != self.module:
            return False
        if self.needs_output and output is None:
            return False
        return self.output is None or output == self.output


@dataclass(frozen=True)
class Upstream:
    """`$upstream`: the message leaves the device for IoT Hub."""


@dataclass(frozen=True)
class ModuleInput:
    module: str
    input: str


Sink = Upstream | ModuleInput


@dataclass(frozen=True)
class Route:
    name: str
    source: Source
    condition: expressions.Expr | None
    sink: Sink
    priority: int = 0
    ttl_seconds: int = DEFAULT_TTL_SECONDS


_ROUTE = re.compile(
    r"^\s*FROM\s+(?P<source>\S+)\s+(?:WHERE\s+(?P<where>.*)\s+)?INTO\s+(?P<sink>.+?)\s*$",
    re.IGNORECASE | re.DOTALL,
)
_NAME = r"[^/\s\"'*]+"
_SOURCES: tuple[tuple[re.Pattern[str], bool], ...] = (
    (re.compile(r"^/\*$|^/messages(?:/\*)?$|^/messages/modules(?:/\*)?$"), False),
    (re.compile(rf"^/messages/modules/(?P<module>{_NAME})(?:/\*)?$"), False),
    (re.compile(rf"^/messages/modules/(?P<module>{_NAME})/outputs(?:/\*)?$"), True),
    (re.compile(rf"^/messages/modules/(?P<module>{_NAME})/outputs/(?P<output>{_NAME})$"), True),
)
_BROKERED = re.compile(
    rf"""^BrokeredEndpoint\(\s*(?P<q>["'])/modules/(?P<module>{_NAME})/inputs/(?P<input>{_NAME})(?P=q)\s*\)$""",
    re.IGNORECASE,
)


def _parse_source(text: str) -> Source:
    if text.lower() == "/twinchangenotifications":
        return Source(twin_changes=True)
    for pattern, needs_output in _SOURCES:
        match = pattern.match(text)
        if match:
            groups = match.groupdict()
            return Source(
                module=groups.get("module"), output=groups.get("output"), needs_output=needs_output
            )
    raise RouteError(f"unsupported route source {text!r}")


def _parse_sink(text: str) -> Sink:
    if text.lower() == "$upstream":
        return Upstream()
    match = _BROKERED.match(text)
    if match is None:
        raise RouteError(f"unsupported route sink {text!r}")
    return ModuleInput(match["module"], match["input"])


def parse_route(
    name: str, text: str, priority: int = 0, ttl_seconds: int = DEFAULT_TTL_SECONDS
) -> Route:
    match = _ROUTE.match(text)
    if match is None:
        raise RouteError(f"route {name!r} is not 'FROM <source> [WHERE <condition>] INTO <sink>'")
    where = match["where"]
    try:
        condition = expressions.parse(where) if where is not None else None
    except expressions.ExpressionError as exc:
        raise RouteError(f"route {name!r}: {exc}") from exc
    return Route(
        name=name,
        source=_parse_source(match["source"]),
        condition=condition,
        sink=_parse_sink(match["sink"]),
        priority=priority,
        ttl_seconds=ttl_seconds,
    )


def parse_routes(routes: Mapping[str, object]) -> tuple[Route, ...]:
    """Routes as `$edgeHub.properties.desired.routes` holds them: strings or route objects."""
    parsed: list[Route] = []
    for name, spec in routes.items():
        if isinstance(spec, str):
            parsed.append(parse_route(name, spec))
        elif isinstance(spec, Mapping) and isinstance(spec.get("route"), str):
            priority = spec.get("priority", 0)
            ttl = spec.get("timeToLiveSecs", DEFAULT_TTL_SECONDS)
            if not isinstance(priority, int) or not isinstance(ttl, int):
                raise RouteError(f"route {name!r}: priority and timeToLiveSecs must be integers")
            parsed.append(parse_route(name, spec["route"], priority, ttl))
        else:
            raise RouteError(f"route {name!r} is neither a string nor a route object")
    return tuple(parsed)


def _lookup(message: Message) -> expressions.Lookup:
    def lookup(name: str) -> expressions.Value | expressions._Undefined:
        if name.startswith("$"):
            value = message.system.get(name[1:])
        else:
            value = message.properties.get(name)
        return expressions.UNDEFINED if value is None else value

    return lookup


def route_matches(route: Route, message: Message) -> bool:
    output = message.system.get("outputName")
    if not route.source.accepts(message.system.get("connectionModuleId"), output):
        return False
    return route.condition is None or expressions.matches(route.condition, _lookup(message))


def routes_for(routes: Iterable[Route], message: Message) -> tuple[Route, ...]:
    """The routes that take `message`, one per distinct sink, highest priority (0) first."""
    chosen: dict[Sink, Route] = {}
    for route in sorted(routes, key=lambda candidate: candidate.priority):
        if route.sink not in chosen and route_matches(route, message):
            chosen[route.sink] = route
    return tuple(chosen.values())


def sinks_for(routes: Iterable[Route], message: Message) -> tuple[Sink, ...]:
    """Each distinct sink of the routes that take `message`, once, in route priority order."""
    return tuple(route.sink for route in routes_for(routes, message))

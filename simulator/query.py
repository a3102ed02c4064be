"""IoT Hub twin queries: `SELECT * FROM devices[.modules] [WHERE ...]` (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from simulator import expressions


class QueryError(ValueError):
    """A query this hub does not understand (IoT Hub answers 400)."""


@dataclass(frozen=True)
class TwinQuery:
    modules: bool  # FROM devices.modules rather than FROM devices
    condition: expressions.Expr | None


_QUERY = re.compile(
    r"^\s*SELECT\s+\*\s+FROM\s+(?P<collection>devices(?:\.modules)?)(?:\s+WHERE\s+(?P<where>.+?))?\s*$",
    re.IGNORECASE | re.DOTALL,
)


def parse_query(text: str) -> TwinQuery:
    match = _QUERY.match(text)
    if match is None:
        raise QueryError("only 'SELECT * FROM devices[.modules] [WHERE ...]' is supported")
    where = match["where"]
    try:
        condition = expressions.parse(where) if where is not None else None
    except expressions.ExpressionError as exc:
        raise QueryError(str(exc)) from exc
    return TwinQuery(modules=match["collection"].lower() == "devices.modules", condition=condition)


def _path_lookup(document: Mapping[str, object]) -> expressions.Lookup:
    def lookup(path: str) -> expressions.Value | expressions._Undefined:
        node: object = document
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return expressions.UNDEFINED
            node = node[part]
        if node is None or isinstance(node, str | int | float | bool):
            return node
        return expressions.UNDEFINED  # objects and arrays do not compare with scalars

    return lookup


def select(query: TwinQuery, twins: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """The twin documents (REST shape) the query selects, in the order given."""
    chosen: list[Mapping[str, object]] = []
    for twin in twins:
        if query.modules != ("moduleId" in twin):
            continue
        if query.condition is None or expressions.matches(query.condition, _path_lookup(twin)):
            chosen.append(twin)
    return chosen


def page(
    items: list[Mapping[str, object]], continuation: str | None, max_items: int
) -> tuple[list[Mapping[str, object]], str | None]:
    """One page of results; the continuation token is the offset of the next page."""
    try:
        start = int(continuation) if continuation else 0
    except ValueError as exc:
        raise QueryError("bad continuation token") from exc
    if start < 0 or max_items < 1:
        raise QueryError("bad continuation token or page size")
    end = start + max_items
    return items[start:end], (str(end) if end < len(items) else None)

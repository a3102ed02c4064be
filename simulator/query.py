"""IoT Hub twin queries over `devices` and `devices.modules` (pure).

    SELECT * | COUNT() [AS name] | path [AS name], ... FROM devices[.modules] [WHERE condition]

The condition language is `expressions`; paths reach into the REST twin document (`tags.ring`,
`properties.reported.model.version`, `configurations.[[id]].status`).
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from simulator import expressions


class QueryError(ValueError):
    """A query this hub does not understand (IoT Hub answers 400)."""


@dataclass(frozen=True)
class Projection:
    path: str
    alias: str


@dataclass(frozen=True)
class TwinQuery:
    modules: bool  # FROM devices.modules rather than FROM devices
    condition: expressions.Expr | None
    projections: tuple[Projection, ...] = ()  # empty: SELECT *
    count_alias: str | None = None  # SELECT COUNT() [AS alias]


_QUERY = re.compile(
    r"^\s*SELECT\s+(?P<select>.+?)\s+FROM\s+(?P<collection>devices(?:\.modules)?)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_COUNT = re.compile(r"^COUNT\(\s*\)(?:\s+AS\s+(?P<alias>[A-Za-z_]\w*))?$", re.IGNORECASE)
_PROJECTION = re.compile(
    r"^(?P<path>(?:\[\[[^\]]+\]\]|[$A-Za-z_][$\w\-]*)(?:\.(?:\[\[[^\]]+\]\]|[$\w\-]+))*)"
    r"(?:\s+AS\s+(?P<alias>[A-Za-z_]\w*))?$",
    re.IGNORECASE,
)


def _select_clause(text: str) -> tuple[tuple[Projection, ...], str | None]:
    text = text.strip()
    if text == "*":
        return (), None
    count = _COUNT.match(text)
    if count is not None:
        return (), count["alias"] or "numberOfDevices"
    projections: list[Projection] = []
    for part in text.split(","):
        match = _PROJECTION.match(part.strip())
        if match is None:
            raise QueryError(f"cannot select {part.strip()!r}")
        path = match["path"]
        projections.append(Projection(path, match["alias"] or expressions.split_path(path)[-1]))
    return tuple(projections), None


def parse_query(text: str) -> TwinQuery:
    match = _QUERY.match(text)
    if match is None:
        raise QueryError("a query is 'SELECT ... FROM devices[.modules] [WHERE ...]'")
    projections, count_alias = _select_clause(match["select"])
    where = match["where"]
    try:
        condition = expressions.parse(where) if where is not None else None
    except expressions.ExpressionError as exc:
        raise QueryError(str(exc)) from exc
    return TwinQuery(
        modules=match["collection"].lower() == "devices.modules",
        condition=condition,
        projections=projections,
        count_alias=count_alias,
    )


def _resolve(document: Mapping[str, object], path: str) -> object:
    node: object = document
    for part in expressions.split_path(path):
        if not isinstance(node, Mapping) or part not in node:
            return expressions.UNDEFINED
        node = node[part]
    return node


def path_lookup(document: Mapping[str, object]) -> expressions.Lookup:
    def lookup(path: str) -> expressions.Value | expressions._Undefined:
        node = _resolve(document, path)
        if node is None or isinstance(node, str | int | float | bool):
            return node
        if isinstance(node, expressions._Undefined):
            return node
        return expressions.COMPOSITE  # objects and arrays do not compare with scalars

    return lookup


def matches(condition: expressions.Expr | None, document: Mapping[str, object]) -> bool:
    return condition is None or expressions.matches(condition, path_lookup(document))


def select(query: TwinQuery, twins: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """What the query returns over the twin documents (REST shape), in the order given."""
    chosen = [
        twin
        for twin in twins
        if query.modules == ("moduleId" in twin) and matches(query.condition, twin)
    ]
    if query.count_alias is not None:
        return [{query.count_alias: len(chosen)}]
    if not query.projections:
        return chosen
    rows: list[Mapping[str, object]] = []
    for twin in chosen:
        row: dict[str, object] = {}
        for projection in query.projections:
            value = _resolve(twin, projection.path)
            if not isinstance(value, expressions._Undefined):
                row[projection.alias] = value
        rows.append(row)
    return rows


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


class Cursors:
    """Results of the queries being paged: the next page is a slice of the rows the first page
    selected (no re-evaluation over the fleet), as IoT Hub's continuation tokens are cursors.
    Tokens are `<cursor>.<offset>`; a cursor forgotten (only the newest `keep` are kept) is
    selected again."""

    def __init__(self, keep: int = 16) -> None:
        self._rows: collections.OrderedDict[str, list[Mapping[str, object]]] = (
            collections.OrderedDict()
        )
        self._keep = keep
        self._ids = itertools.count(1)

    def page(
        self,
        select_rows: Callable[[], list[Mapping[str, object]]],
        continuation: str | None,
        max_items: int,
    ) -> tuple[list[Mapping[str, object]], str | None]:
        if continuation:
            cursor, dot, offset = continuation.partition(".")
            if not dot or not cursor.isdigit():
                raise QueryError("bad continuation token")
            rows = self._rows.pop(cursor, None)
            if rows is None:
                rows = select_rows()
        else:
            cursor, offset, rows = str(next(self._ids)), "0", select_rows()
        items, next_offset = page(rows, offset, max_items)
        if next_offset is None:
            return items, None
        self._rows[cursor] = rows
        while len(self._rows) > self._keep:
            self._rows.popitem(last=False)
        return items, f"{cursor}.{next_offset}"

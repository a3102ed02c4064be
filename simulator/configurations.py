"""IoT Hub configurations (IoT Edge deployments and layered deployments), as pure values.

A configuration has a `targetCondition` over device twins, a `priority` and `content`. An edge
deployment's content is `modulesContent`: per module, `properties.desired` (the whole desired
document) or `properties.desired.<path>` (one value at that path). A deployment that carries
`$edgeAgent` content is a base deployment; one without is a layered deployment.

For each module twin the desired properties are, as IoT Hub documents:
- the base: the highest-priority targeting base deployment (ties: the most recently created),
  else the device's own content (`applyConfigurationContent`, or the simulator's manifest);
- then, with the base, every targeting layered deployment in priority order, lowest first (ties:
  the older one first, so the most recently created wins), each entry replacing the value at its
  path (`properties.desired` replaces the whole document, so a base overrides lower layers).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulator import expressions
from simulator import query as twin_query
from simulator.twins import MAX_DOCUMENT_BYTES, JsonObject

DESIRED = "properties.desired"
EDGE_AGENT = "$edgeAgent"
EDGE_HUB = "$edgeHub"
MAX_CONTENT_BYTES = 512 * 1024  # IoT Edge deployment manifest limit
MAX_METRIC_QUERIES = 5  # custom metric queries per configuration
_ID = re.compile(r"^[a-z0-9\-:+%_#*?!(),=@;$']{1,128}$")
_TARGET = re.compile(r"^\s*(?:FROM\s+devices(?:\.modules)?\s+WHERE\s+)?(?P<where>.+)$", re.I | re.S)


class ConfigurationError(ValueError):
    """A configuration IoT Hub refuses: `status` and `code` are its HTTP answer."""

    def __init__(self, message: str, *, status: int = 400, code: str = "ArgumentInvalid") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def parse_target_condition(text: str) -> expressions.Expr | None:
    """A target condition (`tags.ring = 'canary'`, `*`, or empty for no device)."""
    if not text.strip():
        return None
    if text.strip() == "*":
        return expressions.parse("deviceId = deviceId")
    match = _TARGET.match(text)
    assert match is not None  # `.+` matches any non-blank text
    try:
        return expressions.parse(match["where"])
    except expressions.ExpressionError as exc:
        raise ConfigurationError(f"targetCondition {text!r} is invalid: {exc}") from exc


def _path(key: str, module: str) -> tuple[str, ...]:
    """`properties.desired.a.b` -> ('a', 'b'); `properties.desired` -> ()."""
    if key == DESIRED:
        return ()
    if not key.startswith(DESIRED + "."):
        raise ConfigurationError(
            f"modulesContent.{module} key {key!r} is outside properties.desired: "
            "use 'properties.desired' or 'properties.desired.<path>'"
        )
    path = tuple(key[len(DESIRED) + 1 :].split("."))
    if any(not part or part.startswith("$") for part in path):
        raise ConfigurationError(f"modulesContent.{module} key {key!r} has an invalid path")
    return path


@dataclass(frozen=True)
class ModuleEntry:
    path: tuple[str, ...]
    value: Any


def parse_modules_content(content: object) -> dict[str, tuple[ModuleEntry, ...]]:
    """`modulesContent` as entries per module; every key must be under `properties.desired`."""
    if not isinstance(content, Mapping):
        raise ConfigurationError("modulesContent must be a JSON object")
    parsed: dict[str, tuple[ModuleEntry, ...]] = {}
    for module, section in content.items():
        if not isinstance(section, Mapping):
            raise ConfigurationError(f"modulesContent.{module} must be a JSON object")
        entries: list[ModuleEntry] = []
        for key, value in section.items():
            path = _path(key, module)
            if not path and not isinstance(value, Mapping):
                raise ConfigurationError(f"modulesContent.{module}.{key} must be a JSON object")
            entries.append(ModuleEntry(path, copy.deepcopy(value)))
        size = len(json.dumps({k: v for k, v in section.items()}).encode())
        if size > MAX_DOCUMENT_BYTES:
            raise ConfigurationError(
                f"modulesContent.{module} is {size} bytes; a twin's desired properties are at "
                f"most {MAX_DOCUMENT_BYTES}"
            )
        parsed[module] = tuple(entries)
    return parsed


@dataclass(frozen=True)
class Configuration:
    """One configuration as stored; `document()` is its REST shape."""

    id: str
    target_condition: str
    condition: expressions.Expr | None
    priority: int
    content: JsonObject
    modules: Mapping[str, tuple[ModuleEntry, ...]]
    labels: Mapping[str, str] = field(default_factory=dict)
    metric_queries: Mapping[str, str] = field(default_factory=dict)
    schema_version: str = "1.0"
    created: float = 0.0
    updated: float = 0.0
    sequence: int = 0  # creation order: the tie-break when priorities are equal
    version: int = 1

    @property
    def etag(self) -> str:
        return f"{self.sequence}.{self.version}"

    @property
    def is_edge(self) -> bool:
        return "modulesContent" in self.content

    @property
    def is_base(self) -> bool:
        return EDGE_AGENT in self.modules

    def targets(self, device_twin: Mapping[str, object]) -> bool:
        return self.condition is not None and twin_query.matches(self.condition, device_twin)

    def rank(self) -> tuple[int, int]:
        """Higher wins: priority, then the more recently created."""
        return (self.priority, self.sequence)


def _string_map(value: object, what: str, limit: int | None = None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigurationError(f"{what} must map strings to strings")
    if limit is not None and len(value) > limit:
        raise ConfigurationError(f"{what} has {len(value)} entries; at most {limit}")
    return dict(value)


def parse_metric_queries(queries: Mapping[str, str]) -> dict[str, twin_query.TwinQuery]:
    parsed: dict[str, twin_query.TwinQuery] = {}
    for name, text in queries.items():
        try:
            parsed[name] = twin_query.parse_query(text)
        except twin_query.QueryError as exc:
            raise ConfigurationError(f"metric query {name!r} is invalid: {exc}") from exc
    return parsed


def parse_configuration(
    config_id: str, body: object, *, now: float, sequence: int
) -> Configuration:
    """Validate a REST configuration body as IoT Hub does (400 with the reason otherwise)."""
    if not isinstance(body, Mapping):
        raise ConfigurationError("the configuration must be a JSON object")
    if not _ID.match(config_id):
        raise ConfigurationError(
            f"configuration id {config_id!r} must be 1-128 lowercase letters, digits or "
            "-:+%_#*?!(),=@;$'"
        )
    if body.get("id") not in (None, config_id):
        raise ConfigurationError(f"body id {body.get('id')!r} differs from the URL's {config_id!r}")
    priority = body.get("priority", 0)
    if priority is None:
        priority = 0
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise ConfigurationError(f"priority must be a non-negative integer, not {priority!r}")
    target = body.get("targetCondition") or ""
    if not isinstance(target, str):
        raise ConfigurationError("targetCondition must be a string")
    content = body.get("content")
    if not isinstance(content, Mapping):
        raise ConfigurationError("content is required")
    size = len(json.dumps(content).encode())
    if size > MAX_CONTENT_BYTES:
        raise ConfigurationError(
            f"configuration content is {size} bytes; at most {MAX_CONTENT_BYTES}",
            status=413,
            code="RequestEntityTooLarge",
        )
    present = [k for k in ("modulesContent", "moduleContent", "deviceContent") if content.get(k)]
    if len(present) != 1:
        raise ConfigurationError(
            "content must have exactly one of modulesContent, moduleContent, deviceContent"
        )
    modules = (
        parse_modules_content(content["modulesContent"]) if present == ["modulesContent"] else {}
    )
    metrics = body.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        raise ConfigurationError("metrics must be an object")
    metric_queries = _string_map(metrics.get("queries"), "metrics.queries", MAX_METRIC_QUERIES)
    parse_metric_queries(metric_queries)
    schema = body.get("schemaVersion") or "1.0"
    return Configuration(
        id=config_id,
        target_condition=target,
        condition=parse_target_condition(target),
        priority=priority,
        content=copy.deepcopy(dict(content)),
        modules=modules,
        labels=_string_map(body.get("labels"), "labels"),
        metric_queries=metric_queries,
        schema_version=str(schema),
        created=now,
        updated=now,
        sequence=sequence,
    )


# ---------------------------------------------------------------- layering


def set_at(document: JsonObject, path: Sequence[str], value: Any) -> JsonObject:
    """A copy of `document` with `value` replacing whatever was at `path` (objects created)."""
    if not path:
        return copy.deepcopy(dict(value))
    result = dict(document)
    head, rest = path[0], path[1:]
    if rest:
        child = result.get(head)
        result[head] = set_at(child if isinstance(child, dict) else {}, rest, value)
    else:
        result[head] = copy.deepcopy(value)
    return result


def apply_entries(desired: JsonObject, entries: Iterable[ModuleEntry]) -> JsonObject:
    for entry in entries:
        desired = set_at(desired, entry.path, entry.value)
    return desired


@dataclass(frozen=True)
class Layering:
    """Which configurations shape one device: its base deployment (None: the device's own
    content) and every applied configuration in application order (the base among them)."""

    base: Configuration | None
    ordered: tuple[Configuration, ...]
    targeted: tuple[Configuration, ...]

    def applied(self) -> frozenset[str]:
        return frozenset(c.id for c in self.ordered)


def layering(
    configurations: Iterable[Configuration], device_twin: Mapping[str, object]
) -> Layering:
    """Targeted edge deployments of a device; only the best base among them applies."""
    targeted = tuple(c for c in configurations if c.is_edge and c.targets(device_twin))
    bases = [c for c in targeted if c.is_base]
    base = max(bases, key=Configuration.rank) if bases else None
    applied = [c for c in targeted if not c.is_base or c is base]
    return Layering(base, tuple(sorted(applied, key=Configuration.rank)), targeted)


def module_desired(module: str, own_base: Mapping[str, Any], chosen: Layering) -> JsonObject:
    """The desired properties of `module` on a device: each applied configuration in priority
    order over the device's own content (replaced by a base deployment when one applies); a
    lower-priority layer's values survive only where the base does not set the whole module."""
    desired: JsonObject = {} if chosen.base is not None else copy.deepcopy(dict(own_base))
    for configuration in chosen.ordered:
        desired = apply_entries(desired, configuration.modules.get(module, ()))
    return desired

"""The fleet: edge devices with twins and tags, configurations, and the desired properties they
produce on every module twin. Runs on the simulator loop; the outside world is the callbacks.

Each device keeps its own content (the manifest's desired properties plus the service's direct
patches, or what `applyConfigurationContent` set); configurations layer over it (see
`configurations`). Any change of tags, of a configuration, or of the own content re-evaluates
the affected devices, and each module twin whose desired document changes gets one new
`$version` and the difference as an ordinary desired-property patch.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from simulator import configurations as cfg
from simulator import query as twin_query
from simulator import routes as routing
from simulator.errors import ServiceError
from simulator.twins import JsonObject, Twin, TwinError, desired_delta, etag_matches

log = structlog.get_logger(__name__)

Notify = Callable[[str, str, Mapping[str, Any], int], None]
Event = Callable[[str, str, str, Mapping[str, Any]], None]


@dataclass
class Device:
    """One edge device: its twin (tags), modules, own content and the routes of its edgeHub."""

    twin: Twin
    modules: tuple[str, ...]
    own: dict[str, JsonObject]  # module (and $edgeHub) -> desired without configurations
    routes: tuple[routing.Route, ...]
    routes_source: object = None  # the `routes` object the routes were parsed from
    targeted: frozenset[str] = frozenset()
    applied: frozenset[str] = frozenset()
    configurations: dict[str, dict[str, str]] = field(default_factory=dict)


class Fleet:
    """Every device, the configurations, and the service operations on them; `notify` sends a
    module its desired patch, `event` feeds `watch`."""

    def __init__(
        self,
        devices: Mapping[str, Device],
        twins: dict[tuple[str, str], Twin],
        *,
        notify: Notify,
        event: Event,
        connected: Callable[[str, str], bool],
        clock: Callable[[], float],
    ) -> None:
        self.devices = dict(devices)
        self.twins = twins  # shared with the hub: the module twins
        self.configurations: dict[str, cfg.Configuration] = {}
        self._notify = notify
        self._event = event
        self._connected = connected
        self._clock = clock
        self._sequence = itertools.count(1)

    # -------------------------------------------------------- documents

    def device(self, device_id: str) -> Device:
        try:
            return self.devices[device_id]
        except KeyError:
            raise ServiceError(404, "DeviceNotFound", f"no device {device_id!r}") from None

    def _connected_device(self, device: Device) -> bool:
        return any(self._connected(device.twin.device_id, m) for m in device.modules)

    def device_document(self, device_id: str, *, copied: bool = True) -> JsonObject:
        device = self.device(device_id)
        return device.twin.service_document(
            connected=self._connected_device(device),
            configurations=device.configurations,
            copied=copied,
        )

    def module_document(self, device_id: str, module_id: str, *, copied: bool = True) -> JsonObject:
        twin = self.twins[(device_id, module_id)]
        return twin.service_document(
            connected=self._connected(device_id, module_id),
            configurations=self.devices[device_id].configurations,
            copied=copied,
        )

    def documents(self, modules: bool) -> Iterable[JsonObject]:
        """Every device or module twin, uncopied (readers must not change them)."""
        if modules:
            for device_id, module_id in self.twins:
                yield self.module_document(device_id, module_id, copied=False)
        else:
            for device_id in self.devices:
                yield self.device_document(device_id, copied=False)

    def query(self, query: twin_query.TwinQuery) -> list[Mapping[str, object]]:
        return twin_query.select(query, self.documents(query.modules))

    # -------------------------------------------------------- device twins

    def update_device_twin(
        self, device_id: str, body: object, if_match: str | None, *, replace_all: bool
    ) -> JsonObject:
        """PATCH / PUT `/twins/{id}`: tags (and device desired properties); re-targets."""
        device = self.device(device_id)
        if not etag_matches(if_match, device.twin):
            raise ServiceError(412, "PreconditionFailed", "etag does not match")
        desired, tags = twin_body(body)
        try:
            if replace_all:
                twin = device.twin.replace_desired_and_tags(desired, tags or {})
            else:
                twin = device.twin.patch_tags(tags) if tags else device.twin
                if desired:
                    twin = twin.patch_desired(desired)
        except TwinError as exc:
            raise ServiceError(exc.status, "ArgumentInvalid", str(exc)) from exc
        device.twin = twin
        self.evaluate(device)
        return self.device_document(device_id)

    # -------------------------------------------------------- module twins (service writes)

    # -------------------------------------------------------- configurations

    def configuration(self, config_id: str) -> cfg.Configuration:
        try:
            return self.configurations[config_id]
        except KeyError:
            raise ServiceError(
                404, "ConfigurationNotFound", f"no configuration {config_id!r}"
            ) from None

    def put_configuration(self, config_id: str, body: object, if_match: str | None) -> JsonObject:
        """Create, or update (`If-Match`: etag or `*`) a configuration; re-evaluate the fleet."""
        existing = self.configurations.get(config_id)
        now = self._clock()
        try:
            parsed = cfg.parse_configuration(config_id, body, now=now, sequence=0)
        except cfg.ConfigurationError as exc:
            raise ServiceError(exc.status, exc.code, str(exc)) from exc
        _check_routes(parsed)
        if existing is None:
            if if_match not in (None, "", "*", '"*"'):
                raise ServiceError(
                    404, "ConfigurationNotFound", f"no configuration {config_id!r} to update"
                )
            stored = replace(parsed, sequence=next(self._sequence))
            log.info("configuration_created", id=config_id, priority=stored.priority)
        else:
            if if_match is None:
                raise ServiceError(
                    409, "ConfigurationAlreadyExists", f"configuration {config_id!r} exists"
                )
            if if_match.strip().strip('"') not in ("*", existing.etag):
                raise ServiceError(412, "PreconditionFailed", "etag does not match")
            if parsed.content != existing.content:
                raise ServiceError(
                    400, "ArgumentInvalid", "the content of a configuration cannot be updated"
                )
            stored = replace(
                existing,
                target_condition=parsed.target_condition,
                condition=parsed.condition,
                priority=parsed.priority,
                labels=parsed.labels,
                metric_queries=parsed.metric_queries,
                updated=now,
                version=existing.version + 1,
            )
            log.info("configuration_updated", id=config_id, priority=stored.priority)
        self.configurations[config_id] = stored
        self._event(
            "configuration",
            "",
            "",
            {"id": config_id, "action": "created" if existing is None else "updated"},
        )
        self.evaluate_all()
        return self.configuration_document(config_id)

    def delete_configuration(self, config_id: str, if_match: str | None) -> None:
        existing = self.configuration(config_id)
        if if_match is not None and if_match.strip().strip('"') not in ("*", existing.etag):
            raise ServiceError(412, "PreconditionFailed", "etag does not match")
        del self.configurations[config_id]
        log.info("configuration_deleted", id=config_id)
        self._event("configuration", "", "", {"id": config_id, "action": "deleted"})
        self.evaluate_all()

    def configuration_document(self, config_id: str) -> JsonObject:
        configuration = self.configuration(config_id)
        targeted = sum(config_id in d.targeted for d in self.devices.values())
        applied = sum(config_id in d.applied for d in self.devices.values())
        metrics: dict[str, int] = {}
        for name, query in cfg.parse_metric_queries(configuration.metric_queries).items():
            metrics[name] = len(self.query(query))
        return {
            "id": configuration.id,
            "schemaVersion": configuration.schema_version,
            "labels": dict(configuration.labels),
            "content": copy.deepcopy(configuration.content),
            "targetCondition": configuration.target_condition,
            "createdTimeUtc": _iso(configuration.created),
            "lastUpdatedTimeUtc": _iso(configuration.updated),
            "priority": configuration.priority,
            "systemMetrics": {
                "results": {"targetedCount": targeted, "appliedCount": applied},
                # Shown, not run: the counts above are what these queries select.
                "queries": {
                    "targetedCount": "select deviceId from devices where "  # noqa: S608
                    f"capabilities.iotEdge = true and {configuration.target_condition or 'false'}",
                    "appliedCount": "select deviceId from devices.modules where moduleId = "  # noqa: S608
                    f"'$edgeAgent' and configurations.[[{config_id}]].status = 'Applied'",
                },
            },
            "metrics": {"results": metrics, "queries": dict(configuration.metric_queries)},
            "etag": configuration.etag,
        }

    def list_configurations(self, top: int | None) -> list[JsonObject]:
        ordered = sorted(self.configurations.values(), key=lambda c: c.sequence)
        return [self.configuration_document(c.id) for c in ordered[:top]]

    def test_queries(self, body: object) -> JsonObject:
        """`/configurations/testQueries`: each query's error, empty when it parses."""
        if not isinstance(body, Mapping):
            raise ServiceError(400, "ArgumentInvalid", "the body must be a JSON object")
        target_error = ""
        target = body.get("targetCondition") or ""
        if not isinstance(target, str):
            raise ServiceError(400, "ArgumentInvalid", "targetCondition must be a string")
        try:
            cfg.parse_target_condition(target)
        except cfg.ConfigurationError as exc:
            target_error = str(exc)
        errors: dict[str, str] = {}
        queries = body.get("customMetricQueries") or {}
        if not isinstance(queries, Mapping):
            raise ServiceError(400, "ArgumentInvalid", "customMetricQueries must be an object")
        for name, text in queries.items():
            try:
                twin_query.parse_query(str(text))
            except twin_query.QueryError as exc:
                errors[name] = str(exc)
        return {"targetConditionError": target_error, "customMetricQueryErrors": errors}

    def apply_on_edge_device(self, device_id: str, body: object) -> None:
        """`applyConfigurationContent`: the device's own content becomes `modulesContent`."""
        device = self.device(device_id)
        if not isinstance(body, Mapping) or not isinstance(body.get("modulesContent"), Mapping):
            raise ServiceError(400, "ArgumentInvalid", "modulesContent is required")
        try:
            modules = cfg.parse_modules_content(body["modulesContent"])
        except cfg.ConfigurationError as exc:
            raise ServiceError(exc.status, exc.code, str(exc)) from exc
        own = {
            name: cfg.apply_entries({}, modules.get(name, ()))
            for name in (*device.modules, cfg.EDGE_HUB)
        }
        _parse_routes(own[cfg.EDGE_HUB].get("routes", {}))
        device.own = own
        self.evaluate(device)

    # -------------------------------------------------------- evaluation

    def evaluate_all(self) -> None:
        for device in self.devices.values():
            self.evaluate(device)

    def evaluate(self, device: Device) -> None:
        """Recompute the device's layering and push each changed module's desired patch."""
        device_id = device.twin.device_id
        chosen = cfg.layering(
            self.configurations.values(),
            device.twin.service_document(connected=False, copied=False),
        )
        targeted = frozenset(c.id for c in chosen.targeted)
        applied = chosen.applied()
        if (targeted, applied) != (device.targeted, device.applied):
            self._event(
                "targeting",
                device_id,
                "",
                {"targeted": sorted(targeted), "applied": sorted(applied)},
            )
        device.targeted, device.applied = targeted, applied
        device.configurations = {
            cid: {"status": "Applied" if cid in device.applied else "Targeted"}
            for cid in sorted(device.targeted)
        }
        for module_id in device.modules:
            desired = cfg.module_desired(module_id, device.own.get(module_id, {}), chosen)
            twin = self.twins[(device_id, module_id)]
            if desired == twin.desired:
                continue
            patch = desired_delta(twin.desired, desired)
            try:
                updated = twin.with_desired(desired)
            except TwinError as exc:
                log.warning("configuration_not_applied", device_id=device_id, reason=str(exc))
                continue
            self.twins[(device_id, module_id)] = updated
            self._notify(device_id, module_id, patch, updated.desired_version)
        hub_desired = cfg.module_desired(cfg.EDGE_HUB, device.own.get(cfg.EDGE_HUB, {}), chosen)
        source = hub_desired.get("routes", {})
        if source != device.routes_source:
            device.routes = _parse_routes(source)
            device.routes_source = source


def _parse_routes(source: object) -> tuple[routing.Route, ...]:
    if not isinstance(source, Mapping):
        raise ServiceError(400, "ArgumentInvalid", "$edgeHub routes must be an object")
    try:
        return routing.parse_routes(source)
    except routing.RouteError as exc:
        raise ServiceError(400, "ArgumentInvalid", f"$edgeHub routes: {exc}") from exc


def _check_routes(configuration: cfg.Configuration) -> None:
    hub = cfg.apply_entries({}, configuration.modules.get(cfg.EDGE_HUB, ()))
    _parse_routes(hub.get("routes", {}))


def twin_body(body: object) -> tuple[Mapping[str, Any], Mapping[str, Any] | None]:
    """(desired, tags) from a service twin body; reported may not be written by the service."""
    if not isinstance(body, Mapping):
        raise ServiceError(400, "ArgumentInvalid", "twin must be a JSON object")
    properties = body.get("properties") or {}
    tags = body.get("tags")
    if not isinstance(properties, Mapping) or (tags is not None and not isinstance(tags, Mapping)):
        raise ServiceError(400, "ArgumentInvalid", "properties and tags must be objects")
    if properties.get("reported"):
        raise ServiceError(400, "ArgumentInvalid", "reported properties are read-only")
    desired = properties.get("desired") or {}
    if not isinstance(desired, Mapping):
        raise ServiceError(400, "ArgumentInvalid", "desired must be an object")
    return {k: v for k, v in desired.items() if not k.startswith("$")}, tags


def _iso(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def new_device(
    device_id: str,
    modules: Iterable[str],
    *,
    tags: Mapping[str, Any],
    own: Mapping[str, Mapping[str, Any]],
    routes: tuple[routing.Route, ...],
    routes_source: object,
) -> Device:
    twin = Twin(device_id, "")
    if tags:
        try:
            twin = replace(twin.patch_tags(json.loads(json.dumps(dict(tags)))), version=1)
        except (TwinError, TypeError) as exc:
            raise ValueError(f"device {device_id!r}: tags: {exc}") from exc
    module_ids = tuple(modules)
    return Device(
        twin=twin,
        modules=module_ids,
        own={name: copy.deepcopy(dict(own.get(name, {}))) for name in (*module_ids, cfg.EDGE_HUB)},
        routes=routes,
        routes_source=routes_source,
    )

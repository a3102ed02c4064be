"""Module twins: desired and reported documents, their versions and etags (pure values).

Each change returns a new `Twin`; the hub keeps the current ones. A patch is a JSON merge patch:
`null` deletes, objects merge, anything else replaces. Versions count changes: `desired_version`
(the `$version` a module sees), `reported_version`, and `version` for the whole twin, from which
the etag is derived, so any change gives a new etag.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

JsonObject = dict[str, Any]

MAX_DOCUMENT_BYTES = 32 * 1024  # IoT Hub's limit for each of tags, desired and reported
MAX_DEPTH = 10


class TwinError(ValueError):
    """A twin document or patch IoT Hub would refuse; `status` is the HTTP status it answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


NEVER_ACTIVE = "0001-01-01T00:00:00Z"


def activity_time(seconds: float) -> str:
    """A POSIX time as IoT Hub writes `lastActivityTime` (UTC, 7 fraction digits, Z)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


@functools.lru_cache(maxsize=4096)  # a fleet's documents share few versions
def etag_for(version: int) -> str:
    return base64.b64encode(version.to_bytes(8, "big")).decode("ascii")


def _check_names(document: Mapping[str, Any], depth: int = 1) -> None:
    if depth > MAX_DEPTH:
        raise TwinError(f"twin document deeper than {MAX_DEPTH} levels")
    for name, value in document.items():
        if not name or name.startswith("$") or any(char in name for char in ". "):
            raise TwinError(f"property name {name!r} is not allowed in a twin")
        if isinstance(value, Mapping):
            _check_names(value, depth + 1)


def _check_size(document: Mapping[str, Any], what: str) -> None:
    if len(json.dumps(document, separators=(",", ":")).encode()) > MAX_DOCUMENT_BYTES:
        raise TwinError(f"{what} larger than {MAX_DOCUMENT_BYTES} bytes", status=413)


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> JsonObject:
    merged: JsonObject = copy.deepcopy(dict(target))
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = merge_patch(merged[name], value)
        elif isinstance(value, Mapping):
            merged[name] = merge_patch({}, value)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def _validated(document: Mapping[str, Any], what: str) -> JsonObject:
    if not isinstance(document, Mapping):
        raise TwinError(f"{what} must be a JSON object")
    _check_names(document)
    return dict(document)


@dataclass(frozen=True)
class Twin:
    device_id: str
    module_id: str
    desired: JsonObject = field(default_factory=dict)
    reported: JsonObject = field(default_factory=dict)
    tags: JsonObject = field(default_factory=dict)
    desired_version: int = 1
    reported_version: int = 1
    version: int = 1
    # When the device or module last reported, as IoT Hub's query shows it (its value for never).
    last_activity_time: str = NEVER_ACTIVE

    @property
    def etag(self) -> str:
        return etag_for(self.version)

    # -------------------------------------------------------- changes

    def patch_reported(self, patch: Mapping[str, Any]) -> Twin:
        reported = merge_patch(self.reported, _validated(patch, "reported patch"))
        _check_size(reported, "reported properties")
        return replace(
            self,
            reported=reported,
            reported_version=self.reported_version + 1,
            version=self.version + 1,
        )

    def patch_desired(self, patch: Mapping[str, Any]) -> Twin:
        desired = merge_patch(self.desired, _validated(patch, "desired patch"))
        _check_size(desired, "desired properties")
        return replace(
            self,
            desired=desired,
            desired_version=self.desired_version + 1,
            version=self.version + 1,
        )

    def patch_tags(self, patch: Mapping[str, Any]) -> Twin:
        tags = merge_patch(self.tags, _validated(patch, "tags"))
        _check_size(tags, "tags")
        return replace(self, tags=tags, version=self.version + 1)

    def with_tags(self, tags: Mapping[str, Any]) -> Twin:
        new_tags = merge_patch({}, _validated(tags, "tags"))
        _check_size(new_tags, "tags")
        return replace(self, tags=new_tags, version=self.version + 1)

    def with_desired(self, desired: Mapping[str, Any]) -> Twin:
        """The desired document a configuration computed, as one new desired version."""
        new_desired = _validated(desired, "desired properties")
        _check_size(new_desired, "desired properties")
        return replace(
            self,
            desired=new_desired,
            desired_version=self.desired_version + 1,
            version=self.version + 1,
        )

    def replace_desired_and_tags(self, desired: Mapping[str, Any], tags: Mapping[str, Any]) -> Twin:
        new_desired = merge_patch({}, _validated(desired, "desired properties"))
        new_tags = merge_patch({}, _validated(tags, "tags"))
        _check_size(new_desired, "desired properties")
        _check_size(new_tags, "tags")
        return replace(
            self,
            desired=new_desired,
            tags=new_tags,
            desired_version=self.desired_version + 1,
            version=self.version + 1,
        )

    # -------------------------------------------------------- views

    def device_document(self) -> JsonObject:
        """The twin as a module reads it over MQTT (`$iothub/twin/GET`)."""
        return {
            "desired": {**copy.deepcopy(self.desired), "$version": self.desired_version},
            "reported": {**copy.deepcopy(self.reported), "$version": self.reported_version},
        }

    def service_document(
        self,
        *,
        connected: bool,
        configurations: Mapping[str, Any] | None = None,
        copied: bool = True,
    ) -> JsonObject:
        """The twin as the service REST API returns it; a device twin (empty `module_id`) has
        no moduleId and the IoT Edge capability. `copied=False` shares the twin's own
        dictionaries, for a reader that only looks (query matching, serialising)."""
        clone = copy.deepcopy if copied else _same
        document: JsonObject = {"deviceId": self.device_id}
        if self.module_id:
            document["moduleId"] = self.module_id
        document.update(
            {
                "etag": self.etag,
                "deviceEtag": self.etag,
                "version": self.version,
                "status": "enabled",
                "connectionState": "Connected" if connected else "Disconnected",
                "lastActivityTime": self.last_activity_time,
                "authenticationType": "sas",
                "cloudToDeviceMessageCount": 0,
                "tags": clone(self.tags),
                "properties": {
                    "desired": {**clone(self.desired), "$version": self.desired_version},
                    "reported": {**clone(self.reported), "$version": self.reported_version},
                },
            }
        )
        if not self.module_id:
            document["capabilities"] = {"iotEdge": True}
        if configurations:
            document["configurations"] = clone(dict(configurations))
        return document


def _same(value: Any) -> Any:
    return value


def desired_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> JsonObject:
    """The merge patch that turns `before` into `after` (sent to the module on a replace)."""
    delta: JsonObject = {}
    for name in before.keys() - after.keys():
        delta[name] = None
    for name, value in after.items():
        old = before.get(name)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = desired_delta(old, value)
            if nested:
                delta[name] = nested
        elif name not in before or old != value:
            delta[name] = copy.deepcopy(value)
    return delta


def etag_matches(if_match: str | None, twin: Twin) -> bool:
    """If-Match as IoT Hub reads it: absent or `*` matches; quotes around the etag are optional."""
    if if_match is None or if_match.strip() in ("", "*", '"*"'):
        return True
    return if_match.strip().strip('"') == twin.etag

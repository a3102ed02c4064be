"""IoT Hub MQTT topics and the property bag the device SDK puts in them (pure).

Device and module ids are never URL-encoded in a topic (IoT Hub does not decode them); property
names and values are, with `quote(safe="")`, never `+` for a space.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

# System properties as the device SDK spells them in a property bag, and as the routing query
# language names them.
SYSTEM_PROPERTY_KEYS: Mapping[str, str] = {
    "$.mid": "messageId",
    "$.cid": "correlationId",
    "$.uid": "userId",
    "$.ct": "contentType",
    "$.ce": "contentEncoding",
    "$.exp": "expiryTimeUtc",
    "$.ifid": "interfaceId",
    "$.on": "outputName",
    "$.cdid": "connectionDeviceId",
    "$.cmid": "connectionModuleId",
}
_KEY_FOR_SYSTEM_NAME = {name: key for key, name in SYSTEM_PROPERTY_KEYS.items()}

MAX_MESSAGE_BYTES = 256 * 1024  # IoT Hub's device-to-cloud limit, body and properties together


class TopicError(ValueError):
    """A topic IoT Hub would not accept from this client."""


@dataclass(frozen=True)
class Message:
    """A routed message: body, system properties (by query-language name) and app properties."""

    body: bytes
    system: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        names = (*self.system, *self.system.values(), *self.properties, *self.properties.values())
        return len(self.body) + sum(len(text.encode()) for text in names)

    def to_json(self) -> dict[str, object]:
        try:
            body: object = self.body.decode("utf-8")
        except UnicodeDecodeError:
            body = None
        return {
            "body": body,
            "body_hex": None if body is not None else self.body.hex(),
            "system": dict(self.system),
            "properties": dict(self.properties),
        }


# ---------------------------------------------------------------- property bag


def decode_property_bag(bag: str) -> tuple[dict[str, str], dict[str, str]]:
    """(system properties by query-language name, application properties) from `a=1&$.ct=x`."""
    system: dict[str, str] = {}
    properties: dict[str, str] = {}
    if not bag:
        return system, properties
    for entry in bag.split("&"):
        if not entry:
            continue
        raw_key, _, raw_value = entry.partition("=")
        key = urllib.parse.unquote(raw_key)
        value = urllib.parse.unquote(raw_value)
        if key in SYSTEM_PROPERTY_KEYS:
            system[SYSTEM_PROPERTY_KEYS[key]] = value
        else:
            properties[key] = value
    return system, properties


def encode_property_bag(system: Mapping[str, str], properties: Mapping[str, str]) -> str:
    pairs = [(_KEY_FOR_SYSTEM_NAME[name], value) for name, value in system.items()]
    pairs += sorted(properties.items())
    return urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)


def _query(topic: str) -> dict[str, str]:
    """`$rid`, `$version` and friends from the part after `?`."""
    _, _, query = topic.partition("?")
    values: dict[str, str] = {}
    for entry in query.split("&"):
        if entry:
            key, _, value = entry.partition("=")
            values[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return values


# ---------------------------------------------------------------- what a client publishes


@dataclass(frozen=True)
class Telemetry:
    message: Message


@dataclass(frozen=True)
class TwinGet:
    request_id: str


@dataclass(frozen=True)
class TwinReportedPatch:
    request_id: str


@dataclass(frozen=True)
class MethodResponse:
    request_id: str
    status: int


ClientTopic = Telemetry | TwinGet | TwinReportedPatch | MethodResponse


def _request_id(topic: str) -> str:
    request_id = _query(topic).get("$rid")
    if not request_id:
        raise TopicError("request without $rid")
    return request_id


def parse_client_topic(topic: str, payload: bytes, device_id: str, module_id: str) -> ClientTopic:
    """What a publish from `device_id/module_id` on `topic` asks for."""
    events_prefix = f"devices/{device_id}/modules/{module_id}/messages/events/"
    if topic.startswith(events_prefix) or topic == events_prefix.rstrip("/"):
        system, properties = decode_property_bag(topic[len(events_prefix) :])
        system["connectionDeviceId"] = device_id
        system["connectionModuleId"] = module_id
        return Telemetry(Message(body=payload, system=system, properties=properties))
    if topic.startswith("devices/"):
        raise TopicError("telemetry topic for another identity, or malformed")
    if topic.startswith("$iothub/twin/GET/"):
        return TwinGet(_request_id(topic))
    if topic.startswith("$iothub/twin/PATCH/properties/reported/"):
        return TwinReportedPatch(_request_id(topic))
    if topic.startswith("$iothub/methods/res/"):
        status_text = topic.split("/")[3]
        try:
            status = int(urllib.parse.unquote(status_text))
        except ValueError as exc:
            raise TopicError("method response status is not an integer") from exc
        return MethodResponse(_request_id(topic), status)
    raise TopicError("topic not served by IoT Hub")


# ---------------------------------------------------------------- what the hub publishes


def twin_response_topic(status: int, request_id: str, version: int | None = None) -> str:
    topic = f"$iothub/twin/res/{status}/?$rid={urllib.parse.quote(request_id, safe='')}"
    return topic if version is None else f"{topic}&$version={version}"


def desired_patch_topic(version: int) -> str:
    return f"$iothub/twin/PATCH/properties/desired/?$version={version}"


def method_request_topic(method_name: str, request_id: str) -> str:
    name = urllib.parse.quote(method_name, safe="")
    return f"$iothub/methods/POST/{name}/?$rid={urllib.parse.quote(request_id, safe='')}"


def input_topic(device_id: str, module_id: str, input_name: str, message: Message) -> str:
    """Where edgeHub delivers a routed message; it names the sender with `$.cdid`/`$.cmid`."""
    system = {name: value for name, value in message.system.items() if name != "outputName"}
    bag = encode_property_bag(system, message.properties)
    name = urllib.parse.quote(input_name, safe="")
    return f"devices/{device_id}/modules/{module_id}/inputs/{name}/{bag}"


def desired_patch_payload(patch: Mapping[str, object], version: int) -> bytes:
    return json.dumps({**patch, "$version": version}).encode()

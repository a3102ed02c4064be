"""The base deployment manifest, rendered from ``deployment.template.json`` and validated.

Who owns which twin path (the layered deployments are written by ``release``):

=================================================  =========================================
path                                               owner
=================================================  =========================================
``$edgeAgent`` (modules, images, createOptions)    this base deployment (priority 0)
``$edgeHub`` (routes, store and forward)           this base deployment
``<agent>.properties.desired.telemetry/drift``     this base deployment
``<agent>.properties.desired.models.<name>``       one layered deployment per ring and model
=================================================  =========================================

So the base never carries ``models``: a base that did would fight the rings' layers on every
device whose ring has no layer yet. ``render`` refuses such a template.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deployment.errors import PublisherError, Reason
from wire.profile import ProfileDocument

TEMPLATE = Path(__file__).resolve().parents[1] / "deployment.template.json"
AGENT_MODULE = "mlagent"
# IoT Hub caps one deployment's content; the agent's desired part shares the 32 KB twin cap.
MAX_DEPLOYMENT_BYTES = 512 * 1024
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def load_profile(path: Path) -> ProfileDocument:
    """The profiler's ``profile.json``, read with the profiler's own reader."""
    # The profiler package brings aiohttp and ONNX Runtime: only --profile pays for them.
    from agent.profiler import read_profile  # noqa: PLC0415

    try:
        return read_profile(path.read_bytes())
    except FileNotFoundError as e:
        raise PublisherError(Reason.SCHEMA_INVALID, f"no profile file {str(path)!r}") from e
    except (OSError, ValueError) as e:
        raise PublisherError(Reason.SCHEMA_INVALID, f"{e} (in {str(path)!r})") from e


# Placeholders whose values are credentials: only from the environment (secret precedence),
# never from the command line, where they would land in shell history and process lists.
_SECRET_PLACEHOLDER = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)$")


def is_secret_placeholder(name: str) -> bool:
    return name != "EDGEML_TRUSTED_KEYS" and bool(_SECRET_PLACEHOLDER.search(name))


def placeholders(node: Any) -> set[str]:
    """Every ``${NAME}`` in a template (pure)."""
    if isinstance(node, str):
        return set(_PLACEHOLDER.findall(node))
    if isinstance(node, Mapping):
        return set().union(*(placeholders(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(placeholders(v) for v in node)) if node else set()
    return set()


def _without_stopped_modules(template: Mapping[str, Any]) -> dict[str, Any]:
    trimmed = copy.deepcopy(dict(template))
    modules = (
        trimmed.get("modulesContent", {})
        .get("$edgeAgent", {})
        .get("properties.desired", {})
        .get("modules", {})
    )
    for name in [n for n, m in modules.items() if isinstance(m, Mapping)]:
        if modules[name].get("status") == "stopped":
            del modules[name]
    return trimmed


def required_placeholders(template: Mapping[str, Any]) -> set[str]:
    """The placeholders a manifest cannot do without (pure): those of a module the template
    ships ``stopped`` (the metrics-collector while the Prometheus path runs) may stay empty
    until someone turns it on."""
    return placeholders(_without_stopped_modules(template))


def _substitute(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda match: values[match[1]], node)
    if isinstance(node, Mapping):
        return {key: _substitute(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(item, values) for item in node]
    return node


def render(
    template: Mapping[str, Any],
    *,
    images: Mapping[str, str],
    trusted_keys: str,
    settings: Mapping[str, str] | None = None,
    profile: ProfileDocument | None = None,
    agent: str = AGENT_MODULE,
) -> dict[str, Any]:
    """The deployment manifest (pure): placeholders filled, the profile's limits applied."""
    values = {f"MODULES.{name}": image for name, image in images.items()}
    values["EDGEML_TRUSTED_KEYS"] = trusted_keys
    values.update(settings or {})
    missing = sorted(required_placeholders(template) - set(values))
    if missing:
        raise PublisherError(
            Reason.SCHEMA_INVALID,
            "template placeholders without a value: "
            + ", ".join(
                f"${{{n}}} ("
                + (
                    f"secret: set {n} or {n}_FILE"
                    if is_secret_placeholder(n)
                    else "--module-image"
                    if n.startswith("MODULES.")
                    else "--set"
                )
                + ")"
                for n in missing
            ),
        )
    # A stopped module's unset placeholders render empty: filled in when it is turned on.
    values = {name: "" for name in placeholders(template)} | values
    rendered: dict[str, Any] = _substitute(copy.deepcopy(dict(template)), values)
    rendered.pop("$schema-template", None)
    if profile is not None:
        module = rendered["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"][agent]
        host = module["settings"]["createOptions"].setdefault("HostConfig", {})
        host.update(profile.recommendation.createOptions.HostConfig.model_dump())
        env = module.setdefault("env", {})
        for name, value in profile.recommendation.settings.items():
            env[name] = {"value": value}
    validate(rendered, agent=agent)
    return rendered


def validate(manifest: Mapping[str, Any], *, agent: str = AGENT_MODULE) -> None:
    """What IoT Hub and the agent need of a base deployment; raises naming the problem."""
    text = json.dumps(manifest)
    if len(text.encode()) > MAX_DEPLOYMENT_BYTES:
        raise PublisherError(Reason.SCHEMA_INVALID, "deployment larger than 512 KB")
    leftover = _PLACEHOLDER.search(text)
    if leftover:
        raise PublisherError(Reason.SCHEMA_INVALID, f"unfilled placeholder {leftover[0]}")
    try:
        content = manifest["modulesContent"]
        edge_agent = content["$edgeAgent"]["properties.desired"]
        modules = edge_agent["modules"]
        routes = content["$edgeHub"]["properties.desired"]["routes"]
    except (KeyError, TypeError) as e:
        raise PublisherError(
            Reason.SCHEMA_INVALID, f"deployment lacks modulesContent entry {e}"
        ) from e
    if agent not in modules:
        raise PublisherError(Reason.SCHEMA_INVALID, f"deployment has no module {agent!r}")
    for name, module in modules.items():
        image = module.get("settings", {}).get("image", "")
        if not isinstance(image, str) or not image or any(c.isspace() for c in image):
            raise PublisherError(Reason.SCHEMA_INVALID, f"module {name!r}: bad image {image!r}")
    for name, route in routes.items():
        if not isinstance(route, str) or not route.upper().startswith("FROM "):
            raise PublisherError(Reason.SCHEMA_INVALID, f"route {name!r} is not FROM ... INTO")
    desired = content.get(agent, {}).get("properties.desired", {})
    if "models" in desired or "model" in desired:
        raise PublisherError(
            Reason.SCHEMA_INVALID,
            f"the base deployment sets {agent}'s models: that path belongs to the ring layers",
        )


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PublisherError(Reason.SCHEMA_INVALID, f"template {str(path)!r}: {e}") from e
    return loaded

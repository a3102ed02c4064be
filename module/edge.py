"""The IoT Edge module: the agent's twin, routes, direct methods and telemetry over edgeHub.

This file composes the pieces, each in a module of its own: the hub client and its SDK
threads (`connection`), the `infer` input (`routes`), direct methods (`methods`), telemetry
and health (`telemetry`), reported properties and model entries (`reported`), desired-state
reconciliation (`desired`), and the alert spool (`outbox`). Here: the control loop (desired
patches, twin reads on reconnect, method calls) and what the twin says.

Twin contract (README "Module twin"): desired `models: {<name>: <signed manifest>}` (or the
`model` shorthand for one), reported `models.<name>` per model, `desired` for the last
desired document, `rejected.<name>` for manifests refused before install, `agent`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from azure.iot.device.aio import IoTHubModuleClient
from prometheus_client import CollectorRegistry, Counter

import agent
from agent.observation.limits import Limits
from agent.observation.profile import HeadroomAlarm
from agent.observation.watch import Sinks
from agent.releases.lifecycle import ModelState, ModelStatus
from agent.settings import AgentSettings
from agent.standalone import Agent
from agent.ticks import ticks
from module.connection import ClientFactory, HubConnection
from module.desired import Apply, Ignore, Reconciler, Reject
from module.feedback import FeedbackRoute
from module.methods import DirectMethods
from module.outbox import OutboundMessage, Outbox
from module.reported import EntrySections, ModelEntries, ReportedProperties
from module.routes import InferRoute, RouteMetrics, json_message
from module.settings import ModuleSettings
from module.telemetry import TELEMETRY, Health, Telemetry
from wire.reasons import Reason
from wire.reported import (
    AgentEntry,
    DesiredEntry,
    ModelHealth,
    ProbationEntry,
    RejectedEntry,
    to_twin,
)
from wire.states import FAILED_STATES, DesiredOutcome
from wire.telemetry import ALERT_SCHEMA, PROFILE_SCHEMA, Alert, to_message

log = structlog.get_logger(__name__)

ALERTS = "alerts"
ALERT_STATES = FAILED_STATES
RESYNC_RETRY_S = (1.0, 30.0)  # first and longest delay before reading the twin again


class EdgeModule:
    """Service: the hub client and everything that flows through it."""

    def __init__(
        self,
        agent_settings: AgentSettings,
        settings: ModuleSettings,
        *,
        limits: Limits | None = None,
        registry: CollectorRegistry | None = None,
        client_factory: ClientFactory = IoTHubModuleClient.create_from_edge_environment,
        clock: Callable[[], float] = time.monotonic,
        namespace: str = "agent",
    ) -> None:
        self.name = "edge-module"
        # The module builds its agent, so the observer gets its sinks at construction: window
        # profiles leave as telemetry, drift and quality state changes as alerts and in the
        # model's reported entry. They run on the observer's ticks, once this is built.
        self.agent = agent_ = Agent(
            agent_settings,
            registry,
            limits,
            sinks=Sinks(profile=self._drift_profile, alert=self._drift_alert),
            labelled=True,  # the feedback input labels predictions
        )
        if agent_.manager is None:
            raise ValueError("the IoT Edge module needs the managed mode (no --model file)")
        self._manager = manager = agent_.manager
        self._settings = settings
        self._clock = clock
        registry = agent_.registry
        route_metrics = RouteMetrics(registry, namespace)
        self.connection = HubConnection(
            client_factory,
            registry,
            call_timeout_s=settings.call_timeout_s,
            offline_budget_s=settings.offline_budget_s,
            max_queued_messages=settings.max_queued_messages,
            on_dropped=route_metrics.messages.labels("dropped_overload").inc,
            clock=clock,
        )
        self.route = InferRoute(
            self.connection,
            agent_.services,
            agent_.metrics,
            route_metrics,
            default_model=self.default_model,
            max_in_flight=settings.max_route_in_flight,
            max_input_bytes=settings.max_input_bytes,
            feedback=FeedbackRoute(agent_.observer, route_metrics),
            failures=agent_.failures,
        )
        self.methods = DirectMethods(
            self.connection,
            manager,
            agent_.metrics,
            registry,
            status=self.status,
            default_model=self.default_model,
            limits=agent_.limits,
            failures=agent_.failures,
        )
        self._desired_updates = Counter(
            "desired_updates",
            "Desired-property documents, by what was done with them.",
            ["action"],
            namespace=namespace,
            registry=registry,
        )
        self._reconciler = Reconciler(max_models=settings.max_models)
        self._resync_retry: asyncio.TimerHandle | None = None
        self._resync_delay = RESYNC_RETRY_S[0]
        self._started = datetime.now(UTC)
        self._tasks: list[asyncio.Task[None]] = []
        self._senders: list[asyncio.Task[None]] = []
        self.reported = ReportedProperties(self._send_reported, timeout_s=settings.call_timeout_s)
        self.outbox = Outbox(
            self._send_outbound,
            settings.spool_dir or agent_.settings.store.state_dir / "spool",
            registry=registry,
            send_timeout_s=settings.call_timeout_s,
        )
        self.telemetry = Telemetry(
            agent_.services,
            manager,
            agent_.metrics,
            self.outbox,
            on_health=self._on_health,
            resources=agent_.resources.read,
            on_profile=self._on_profile,
            failures=agent_.failures,
        )
        self._headroom = HeadroomAlarm(settings.memory_headroom_alert_fraction)
        observer = agent_.observer
        self.entries = ModelEntries(
            manager.statuses,
            EntrySections(
                probation=self._probation_of,
                health=self._health_of,
                drift=observer.drift_entry,
                quality=observer.quality_entry,
            ),
        )
        # Names in the reported `rejected` section: entries leave it as they leave the manager.
        self._rejected_shown: set[str] = set()
        self._desired_refusals: dict[str, RejectedEntry] = {}
        manager.add_listener(self._on_model_status)
        manager.add_rejection_listener(self._on_rejection)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self.connection.open()
        # `stopped: null` removes what the previous run reported when it stopped; `model:
        # null` the single-model section of versions before `models`.
        started = AgentEntry(version=agent.__version__, started=self._started, stopped=None)
        self.reported.update({"agent": to_twin(started), "model": None})

    async def run(self) -> None:
        """Until cancelled; raises `HubUnreachable` past the offline budget (the app fails)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.connection.connect_until_up())
            group.create_task(self._control_loop())
            group.create_task(self.route.run())
            self._senders = [
                group.create_task(self.reported.run()),
                group.create_task(self.outbox.run()),
            ]
            group.create_task(self.telemetry.run())
            group.create_task(self.connection.watch())
            group.create_task(self._watch_headroom())

    async def stop(self, grace_s: float) -> None:
        """Stop taking route messages, finish those in flight, report, hand over to the spool."""
        deadline = self._clock() + grace_s
        self.route.accepting = False
        if self._resync_retry is not None:
            self._resync_retry.cancel()
        # The App stops services before it cancels their runs, but `flush` and `drain` send
        # by themselves: the senders' loops end first (one patch, one message in flight).
        for task in self._senders:
            task.cancel("module stopping")
        if self._senders:
            await asyncio.wait(self._senders, timeout=max(grace_s / 4, 0.1))
        await self.route.drain(grace_s / 2)
        self.reported.update({"agent": to_twin(AgentEntry(stopped=datetime.now(UTC)))})
        remaining = max(deadline - self._clock(), 0.1)
        if self.connection.connected:
            await self.reported.flush(remaining / 2)
        await self.outbox.drain(max(deadline - self._clock(), 0.1) / 2)
        await self.connection.close(deadline - self._clock())

    # -- the control loop: desired state, connection changes, methods --------------------

    async def _control_loop(self) -> None:
        events = self.connection.events
        while True:
            kind, item = await events.get()
            try:
                if kind == "patch":
                    await self._on_patch(item)
                elif kind == "connection":
                    await self._on_connection(connected=bool(item))
                elif kind == "resync":
                    self._resync_retry = None
                    if self.connection.connected:  # else the reconnect reads the twin anyway
                        await self._resync()
                else:
                    task = asyncio.get_running_loop().create_task(self.methods.answer(item))
                    self.route.tasks.add(task)
                    task.add_done_callback(self.route.tasks.discard)
            except Exception:  # one bad event must not stop the module
                self.agent.failures.record("control", kind=kind)

    async def _on_connection(self, *, connected: bool) -> None:
        if self.connection.changed(connected=connected) and connected:
            await self._resync()
            self.reported.retry_now()

    async def _resync(self) -> None:
        """On every (re)connect, GET the full twin and apply its desired part."""
        client = self.connection.client
        assert client is not None
        try:
            twin = await self.connection.call(client.get_twin())
        except Exception as error:  # reconnecting: the next connection event tries again
            # Patches missed while offline would stay unapplied until the next patch came:
            # read again after a back-off.
            log.warning("twin_get_failed", error=str(error), retry_s=self._resync_delay)
            if self._resync_retry is None:
                self._resync_retry = self.connection.resync_later(self._resync_delay)
                self._resync_delay = min(self._resync_delay * 2, RESYNC_RETRY_S[1])
            return
        self._resync_delay = RESYNC_RETRY_S[0]
        desired = twin.get("desired", {}) if isinstance(twin, dict) else {}
        self._reconciler, action = self._reconciler.full(desired)
        log.info("twin_read", version=action.version, action=type(action).__name__.lower())
        await self._act(action)
        await self._forget_stale_entries(twin.get("reported") if isinstance(twin, dict) else None)

    async def _forget_stale_entries(self, reported: object) -> None:
        """Entries the twin holds for models this process does not know leave it: a previous
        run stopped between removing a model and reporting that it had."""
        models = reported.get("models") if isinstance(reported, Mapping) else None
        if not isinstance(models, Mapping):
            return
        await self._manager.restored.wait()
        stale = sorted(set(models) - self._manager.names)
        if stale:
            log.info("stale_model_entries_removed", models=stale)
            self.reported.update({"models": dict.fromkeys(stale)})

    async def _on_patch(self, patch: Any) -> None:
        if not isinstance(patch, dict):
            await self._act(Reject(self._reconciler.version, "desired patch is not an object"))
            return
        version = patch.get("$version")
        # The SDK runs handlers on a thread pool, so patches can arrive out of order; a gap in
        # versions means a patch is missing or late, and merging past it would lose it.
        if isinstance(version, int) and version > self._reconciler.version + 1:
            await self._resync()
            return
        self._reconciler, action = self._reconciler.patch(patch)
        await self._act(action)

    async def _act(self, action: Apply | Reject | Ignore) -> None:
        if isinstance(action, Ignore):
            self._desired_updates.labels("ignored").inc()
            return
        if isinstance(action, Reject):
            self._desired_updates.labels("rejected").inc()
            log.warning("desired_rejected", version=action.version, error=action.message)
            refused = DesiredEntry(
                version=action.version,
                state=DesiredOutcome.REJECTED,
                reason=action.reason,
                message=action.message,
            )
            self.reported.update({"desired": to_twin(refused)})
            self._alert("desired_rejected", {"version": action.version, "message": action.message})
            return
        self._desired_updates.labels("applied").inc()
        self.telemetry.retune(action.state.telemetry)
        self.agent.observer.configure(action.state.drift)
        applied = DesiredEntry(
            version=action.version, state=DesiredOutcome.APPLIED, reason=None, message=None
        )
        self.reported.update({"desired": to_twin(applied)})
        releases = action.state.releases()
        # A release must not race the restoring of the model it would replace (a rolled-back
        # release is only recognised once the store's models are restored), nor a removal the
        # restoring of the model it removes.
        await self._manager.restored.wait()
        await self._remove_undesired(action.state.names())
        for name in action.changed:
            self._submit(name, releases[name])

    async def _remove_undesired(self, wanted: frozenset[str] | None) -> None:
        """A model the desired state no longer holds (its layered deployment deleted, or
        `models.<name>: null`) stops serving and leaves the reported twin."""
        if wanted is None:
            return
        for name in sorted(self._manager.names - wanted):
            if await self._manager.remove(name):
                self.reported.update({"models": {name: None}})
        no_longer_desired = self._desired_refusals.keys() - wanted
        for key in no_longer_desired:
            del self._desired_refusals[key]
        if no_longer_desired:
            self._report_rejected()

    def _submit(self, key: str, manifest: Mapping[str, Any]) -> None:
        claimed = manifest.get("name")
        if claimed != key:
            # The map key is what a layered deployment owns: a manifest for another model
            # there must not replace that model.
            self._refuse_desired(
                key,
                Reason.NAME_MISMATCH,
                f"desired models.{key} holds a manifest named {str(claimed)[:63]!r}",
            )
            return
        self._desired_refusals.pop(key, None)
        self._manager.submit(dict(manifest))

    # -- what the twin says ------------------------------------------------------------

    def _on_model_status(self, status: ModelStatus) -> None:
        self.reported.update(self.entries.patch([status.name]))
        if status.state in ALERT_STATES:
            self._alert(f"model_{status.state.value}", status.to_json())

    def _on_rejection(self, status: ModelStatus) -> None:
        entry = status.to_json()
        self._alert("manifest_rejected", entry)
        self._report_rejected()

    def _refuse_desired(self, key: str, reason: Reason, message: str) -> None:
        log.warning("desired_model_refused", model=key, reason=reason, error=message)
        self._desired_refusals[key] = RejectedEntry(
            version=None,
            sha256=None,
            state=ModelState.REJECTED,
            reason=reason,
            message=message,
            since=datetime.now(UTC),
        )
        self._alert("manifest_rejected", {"name": key, **to_twin(self._desired_refusals[key])})
        self._report_rejected()

    def _report_rejected(self) -> None:
        shown = {name: to_twin(s.rejected()) for name, s in self._manager.rejections.items()}
        shown.update({name: to_twin(e) for name, e in self._desired_refusals.items()})
        gone = {name: None for name in self._rejected_shown - set(shown)}
        self._rejected_shown = set(shown)
        self.reported.update({"rejected": {**gone, **shown}})

    def _probation_of(self, name: str) -> ProbationEntry | None:
        report = self._manager.probation.get(name)
        return report.entry() if report is not None else None

    def _health_of(self, name: str) -> ModelHealth | None:
        health = self.telemetry.health.get(name)  # replaced each window: looked up each time
        return ModelHealth.model_validate(health) if health is not None else None

    def _on_health(self, health: Mapping[str, Health]) -> None:
        # Health and probation counters change with every request: sent at telemetry
        # cadence, not per change.
        self.reported.update(self.entries.patch(self._manager.statuses))

    def _drift_profile(self, message: dict[str, Any]) -> None:
        self.outbox.put(TELEMETRY, message, PROFILE_SCHEMA)

    def _drift_alert(self, message: dict[str, Any]) -> None:
        # The module's one alert shape: {kind, at, details}.
        details = {k: v for k, v in message.items() if k not in ("schema", "event")}
        self._alert(str(message["event"]), details)
        self.reported.update(self.entries.patch([str(message["model"])]))

    def _on_profile(self, profile: dict[str, Any]) -> None:
        self.reported.update({"profile": profile})

    async def _watch_headroom(self) -> None:
        # Its own tick, not telemetry's: telemetry may be off or hourly, memory pressure not.
        async for _ in ticks(self._settings.memory_check_interval_s):
            try:
                resources = self.agent.resources.read()
                kind = self._headroom.update(resources)
                if kind is not None:
                    log.warning(kind, **resources.as_json())
                    self._alert(kind, resources.as_json())
            except Exception:  # the next check reads again
                self.agent.failures.record("headroom")

    def _alert(self, kind: str, details: dict[str, Any]) -> None:
        alert = Alert(kind=kind, at=datetime.now(UTC), details=details)
        self.outbox.put(ALERTS, to_message(alert), ALERT_SCHEMA)

    async def _send_reported(self, patch: dict[str, Any]) -> None:
        client = self.connection.require()
        await self.connection.call(client.patch_twin_reported_properties(patch))

    async def _send_outbound(self, outbound: OutboundMessage) -> None:
        client = self.connection.require()
        message = json_message(outbound.body, outbound.message_id, outbound.schema)
        await self.connection.call(client.send_message_to_output(message, outbound.output))

    # -- shared by the route and the methods ----------------------------------------------

    def default_model(self) -> str | None:
        """The model a route message or `rollback` without a name means: the one desired model
        that serves, else the only one that serves. A refused manifest never serves, so it
        never becomes the default."""
        services = self.agent.services
        desired = self._reconciler.applied.releases() if self._reconciler.applied else {}
        serving = [name for name in desired if name in services]
        if len(serving) == 1:
            return serving[0]
        names = list(services)
        return names[0] if len(names) == 1 else None

    def status(self) -> dict[str, Any]:
        services = self.agent.services
        return {
            "agent": to_twin(AgentEntry(version=agent.__version__, started=self._started)),
            "hub_connected": self.connection.connected,
            "ready": bool(services) and all(s.ready for s in services.values()),
            "models": {name: to_twin(self.entries.entry(name)) for name in self._manager.statuses},
            "rejected": {name: s.to_json() for name, s in self._manager.rejections.items()},
            "desired_version": self._reconciler.version,
            "outbox": {"queued": self.outbox.queued, "spooled": self.outbox.spooled},
        }

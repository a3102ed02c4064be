"""The fleet's Grafana dashboard as code: `python -m deployment.monitoring.dashboard` writes
`dashboards/edge-fleet.json` (committed), `--check` fails when the committed file is stale.

Panels are plain data (`PanelSpec`), so tests read the same queries Grafana will run. Queries
select devices by the labels the on-device Prometheus adds (hub, ring, device_id, module_id);
`$ring`, `$device` and `$model` are dashboard variables, `$__rate_interval` Grafana's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from grafana_foundation_sdk.builders import common, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model

OUTPUT: Final = Path(__file__).with_name("dashboards") / "edge-fleet.json"
UID: Final = "edge-mlops-fleet"
DATASOURCE: Final = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RING: Final = 'ring=~"$ring"'
DEVICE: Final = 'device_id="$device"'
MODEL: Final = 'model="$model"'
RATE: Final = "[$__rate_interval]"  # Grafana sizes it to at least four scrapes
# A device's drift evidence (its CUSUM level) over the level at which it declares drift: the
# threshold differs per baseline, so the ratio puts every device's alarm at 1.
_EVIDENCE: Final = "(agent_drift_cusum{{{0}}} / agent_drift_threshold{{{0}}})"

Kind = Literal["timeseries", "stat", "table"]


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class PanelSpec:
    title: str
    kind: Kind
    queries: tuple[Query, ...]
    description: str
    unit: str = "short"
    width: int = 8
    threshold: float | None = None  # drawn as a line: the value at which an alert or state fires


def _q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(" ".join(expr.split()), legend),)


FLEET: Final[tuple[PanelSpec, ...]] = (
    PanelSpec(
        "Devices reporting",
        "stat",
        _q(f'count(group by (hub, device_id) (up{{job="edge-agent", {RING}}})) or vector(0)'),
        width=4,
        description=(
            "Devices whose agent answers its on-device Prometheus (`up` of job edge-agent) in the "
            "selected rings."
        ),
    ),
    PanelSpec(
        "Devices silent (seen in the last hour)",
        "stat",
        _q(
            f"""count(
                group by (hub, ring, device_id) (max_over_time(up{{job="edge-agent", {RING}}}[1h]))
                unless on (hub, ring, device_id)
                group by (hub, ring, device_id) (up{{job="edge-agent"}})
            ) or vector(0)"""
        ),
        width=4,
        description=(
            "Devices that reported in the last hour but not now: off, offline, or their Prometheus "
            "module is down (alert EdgeDeviceSilent)."
        ),
    ),
    PanelSpec(
        "Devices off the hub",
        "stat",
        _q(f"count(agent_hub_connected{{{RING}}} == 0) or vector(0)"),
        width=4,
        description=(
            "Agents that have lost IoT Hub: inference serves on, while twin updates, telemetry and "
            "alerts wait in the outbox (alert AgentHubDisconnected)."
        ),
    ),
    PanelSpec(
        "Alerts firing",
        "table",
        _q(f'sum by (alertname, severity) (ALERTS{{alertstate="firing", {RING}}})'),
        width=12,
        description=(
            "Alerts firing now in the selected rings, by name and severity; each rule's runbook is "
            "in the README."
        ),
    ),
    PanelSpec(
        "Model versions per ring (devices)",
        "table",
        _q(f"count by (ring, model, version) (agent_model_info{{{RING}}})"),
        width=12,
        description=(
            "How many devices serve each version of each model, per ring: a rollout in progress "
            "shows two versions in a ring."
        ),
    ),
    PanelSpec(
        "Release outcomes, last 15 minutes (devices)",
        "timeseries",
        _q(
            f"sum by (state) (device:agent_model_updates:increase15m{{{RING}}} > bool 0)",
            "{{state}}",
        ),
        width=12,
        description=(
            "Devices whose release ended in each state in the last 15 minutes (active, failed, "
            "rejected, rolled_back)."
        ),
    ),
    PanelSpec(
        "Release failures, last 15 minutes, by reason",
        "timeseries",
        _q(
            f"sum by (reason) (device:agent_model_update_failures:increase15m{{{RING}}})",
            "{{reason}}",
        ),
        width=12,
        description=(
            "Failed or rejected releases by reason (the reported `models.<name>.reason`): many "
            "devices with one reason point at the release, not the devices."
        ),
    ),
    PanelSpec(
        "Requests per second by outcome",
        "timeseries",
        _q(
            f"sum by (outcome) (rate(agent_inference_requests_total{{{RING}}}{RATE}))",
            "{{outcome}}",
        ),
        unit="reqps",
        description=(
            "Inference requests per second: ok, failed (inside ONNX Runtime) and rejected (the "
            "client's mistake)."
        ),
    ),
    PanelSpec(
        "p99 latency per ring",
        "timeseries",
        _q(
            f"""histogram_quantile(0.99, sum by (ring, le) (
                rate(agent_inference_request_duration_seconds_bucket{{{RING}}}{RATE})))""",
            "{{ring}}",
        ),
        unit="s",
        description=("99th percentile of request duration per ring, from the agents' histograms."),
    ),
    PanelSpec(
        "Devices with the most failed inferences",
        "timeseries",
        _q(f"topk(10, device:agent_inference_error_ratio:rate5m{{{RING}}})", "{{device_id}}"),
        unit="percentunit",
        description=(
            "The ten devices with the highest share of accepted requests that failed inside ONNX "
            "Runtime (alert AgentInferenceErrors above 5 %)."
        ),
    ),
    PanelSpec(
        "Devices in drift, per model",
        "timeseries",
        _q(f"sum by (model) (agent_drift_state{{{RING}}} == bool 2)", "{{model}}"),
        threshold=1,
        description=(
            "Devices whose drift detector is in the drift state (agent_drift_state 2: 0 ok, 1 "
            "warning, 2 drift); the line marks the first drifting device."
        ),
    ),
    PanelSpec(
        "Drift evidence over its threshold, 90th percentile of the fleet",
        "timeseries",
        _q(f"quantile by (model) (0.9, {_EVIDENCE.format(RING)})", "{{model}}"),
        threshold=1,
        description=(
            "Accumulated drift evidence over its alarm threshold (CUSUM level / threshold), 90th "
            "percentile of the devices per model; a device declares drift at 1, the line."
        ),
    ),
    PanelSpec(
        "Accuracy, worst device per model",
        "timeseries",
        _q(f"min by (model) (agent_model_accuracy{{{RING}}})", "{{model}}"),
        unit="percentunit",
        description=(
            "Accuracy of the last labelled window on the worst device per model, from ground truth "
            "sent to the `feedback` route (alert AgentModelQualityDrop)."
        ),
    ),
    PanelSpec(
        "Resident memory, largest devices",
        "timeseries",
        _q(
            f'topk(10, process_resident_memory_bytes{{job="edge-agent", {RING}}})',
            "{{device_id}}",
        ),
        unit="bytes",
        description=("Resident memory of the ten largest agent processes."),
    ),
    PanelSpec(
        "Memory headroom, tightest devices",
        "timeseries",
        _q(f"bottomk(10, agent_memory_headroom_bytes{{{RING}}})", "{{device_id}}"),
        unit="bytes",
        description=(
            "Memory left under the container's limit on the ten tightest devices: a hot swap loads "
            "the candidate beside the active model (alert AgentMemoryHeadroomLow)."
        ),
    ),
    PanelSpec(
        "Telemetry dropped by the outbox, last hour",
        "timeseries",
        _q(f"sum by (reason) (increase(agent_outbox_dropped_total{{{RING}}}[1h]))", "{{reason}}"),
        description=(
            "Messages to the hub given up in the last hour, by reason (spool_full, too_large, "
            "corrupt): telemetry lost for good (alert AgentOutboxDropping)."
        ),
    ),
)

DEVICE_PANELS: Final[tuple[PanelSpec, ...]] = (
    PanelSpec(
        "Models served",
        "table",
        _q(f"agent_model_info{{{DEVICE}}}"),
        width=12,
        description=(
            "The models this device serves, with their version and sha256 (agent_model_info)."
        ),
    ),
    PanelSpec(
        "Hub connected",
        "stat",
        _q(f"agent_hub_connected{{{DEVICE}}}"),
        width=4,
        description=("1 while this device's agent is connected to IoT Hub."),
    ),
    PanelSpec(
        "Outbox: queued and spooled",
        "timeseries",
        (
            Query(f"agent_outbox_queued{{{DEVICE}}}", "queued"),
            Query(f"agent_outbox_spooled{{{DEVICE}}}", "spooled"),
        ),
        width=8,
        description=(
            "Messages waiting for the hub in memory (queued) and on disk (spooled): they grow while"
            " the hub is unreachable."
        ),
    ),
    PanelSpec(
        "Requests per second by outcome",
        "timeseries",
        _q(
            f"sum by (outcome) (rate(agent_inference_requests_total{{{DEVICE}}}{RATE}))",
            "{{outcome}}",
        ),
        unit="reqps",
        description=(
            "Inference requests per second: ok, failed (inside ONNX Runtime) and rejected (the "
            "client's mistake)."
        ),
    ),
    PanelSpec(
        "Latency p50 / p99",
        "timeseries",
        tuple(
            Query(
                f"histogram_quantile({q}, sum by (le) (rate("
                f"agent_inference_request_duration_seconds_bucket{{{DEVICE}}}{RATE})))",
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.99)
        ),
        unit="s",
        description=("Median and 99th percentile of this device's request duration."),
    ),
    PanelSpec(
        "Rejected requests by reason",
        "timeseries",
        _q(
            f"sum by (reason) (rate(agent_inference_rejections_total{{{DEVICE}}}{RATE}))",
            "{{reason}}",
        ),
        unit="reqps",
        description=(
            "Requests refused before inference, by reason (bad input, unknown model, too large, not"
            " ready): the clients' mistakes."
        ),
    ),
    PanelSpec(
        "ONNX Runtime calls by dispatch, and rows per call",
        "timeseries",
        (
            Query(
                f"sum by (dispatch) (rate(agent_inference_batches_total{{{DEVICE}}}{RATE}))",
                "{{dispatch}} calls/s",
            ),
            Query(
                f"rate(agent_inference_batch_rows_sum{{{DEVICE}}}{RATE})"
                f" / rate(agent_inference_batch_rows_count{{{DEVICE}}}{RATE})",
                "rows per call",
            ),
        ),
        description=(
            "Calls into ONNX Runtime, inline on the loop or in the worker pool, and the rows micro-"
            "batching puts in each."
        ),
    ),
    PanelSpec(
        "CPU (cores)",
        "timeseries",
        _q(f'rate(process_cpu_seconds_total{{job="edge-agent", {DEVICE}}}{RATE})'),
        description=("CPU the agent process uses, in cores."),
    ),
    PanelSpec(
        "Memory: resident and headroom",
        "timeseries",
        (
            Query(f'process_resident_memory_bytes{{job="edge-agent", {DEVICE}}}', "resident"),
            Query(f"agent_memory_headroom_bytes{{{DEVICE}}}", "headroom"),
        ),
        unit="bytes",
        description=("This agent's resident memory and what is left under its container's limit."),
    ),
    PanelSpec(
        "Release outcomes and swap time",
        "timeseries",
        (
            Query(f"sum by (state) (agent_model_updates_total{{{DEVICE}}})", "{{state}}"),
            Query(
                "histogram_quantile(0.9, sum by (le) ("
                f"rate(agent_model_swap_seconds_bucket{{{DEVICE}}}[1h])))",
                "swap p90 (s)",
            ),
        ),
        description=(
            "Releases by outcome on this device, and the 90th percentile of the swap's duration "
            "over the last hour."
        ),
    ),
    PanelSpec(
        "Drift evidence and threshold per model",
        "timeseries",
        (
            Query(f"agent_drift_cusum{{{DEVICE}}}", "{{model}} evidence"),
            Query(f"agent_drift_threshold{{{DEVICE}}}", "{{model}} threshold"),
        ),
        description=(
            "Each model's accumulated drift evidence (CUSUM level) and the level at which it "
            "declares drift (its threshold), on this device."
        ),
    ),
)

MODEL_PANELS: Final[tuple[PanelSpec, ...]] = (
    PanelSpec(
        "Versions of $model across the fleet (devices)",
        "timeseries",
        _q(f'count by (version) (agent_model_info{{model="$model", {RING}}})', "v{{version}}"),
        description=(
            "Devices serving each version of the selected model: a rollout moves devices from one "
            "line to the next."
        ),
    ),
    PanelSpec(
        "Devices in drift on $model, per ring",
        "timeseries",
        _q(f'sum by (ring) (agent_drift_state{{model="$model", {RING}}} == bool 2)', "{{ring}}"),
        threshold=1,
        description=(
            "Devices whose detector holds the selected model in drift, per ring; the line marks the"
            " first drifting device."
        ),
    ),
    PanelSpec(
        "Drift evidence of $model over its threshold: median and 90th percentile",
        "timeseries",
        tuple(
            Query(
                f"quantile({q}, {_EVIDENCE.format(MODEL + ', ' + RING)})",
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.9)
        ),
        threshold=1,
        description=(
            "Accumulated drift evidence over the alarm threshold (CUSUM level / threshold) across "
            "the devices serving the selected model; a device declares drift at 1, the line."
        ),
    ),
    PanelSpec(
        "Accuracy of $model per ring",
        "timeseries",
        _q(f'avg by (ring) (agent_model_accuracy{{model="$model", {RING}}})', "{{ring}}"),
        unit="percentunit",
        description=(
            "Mean accuracy of the last labelled window per ring for the selected model, from "
            "`feedback` ground truth."
        ),
    ),
    PanelSpec(
        "p99 latency of $model per ring",
        "timeseries",
        _q(
            f"""histogram_quantile(0.99, sum by (ring, le) (rate(
                agent_model_request_duration_seconds_bucket{{model="$model", {RING}}}{RATE}
            )))""",
            "{{ring}}",
        ),
        unit="s",
        description=("99th percentile of the selected model's request duration per ring."),
    ),
)

ROWS: Final[tuple[tuple[str, tuple[PanelSpec, ...]], ...]] = (
    ("Fleet overview", FLEET),
    ("Device $device", DEVICE_PANELS),
    ("Model $model", MODEL_PANELS),
)


def _target(query: Query, ref_id: str) -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(query.expr).ref_id(ref_id).datasource(DATASOURCE)
    return target.legend_format(query.legend) if query.legend else target


def _panel(spec: PanelSpec, panel_id: int) -> timeseries.Panel | stat.Panel | table.Panel:
    builder: timeseries.Panel | stat.Panel | table.Panel
    if spec.kind == "timeseries":
        builder = timeseries.Panel()
        if spec.threshold is not None:
            steps = [
                model.Threshold(value=None, color="green"),
                model.Threshold(value=spec.threshold, color="red"),
            ]
            builder.thresholds(
                db.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps)
            ).thresholds_style(
                common.GraphThresholdsStyleConfig().mode(
                    common_model.GraphThresholdsStyleMode.DASHED
                )
            )
    elif spec.kind == "stat":
        builder = stat.Panel()
    else:
        builder = table.Panel()
    builder.id(panel_id).title(spec.title).description(spec.description)
    builder.unit(spec.unit).span(spec.width).height(8).datasource(DATASOURCE)
    for index, query in enumerate(spec.queries):
        builder.with_target(_target(query, chr(ord("A") + index)))
    return builder


def _variable(name: str, label: str, query: str, *, multi: bool) -> db.QueryVariable:
    variable = (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    return variable.multi(True).include_all(True).all_value(".*") if multi else variable


def build() -> model.Dashboard:
    dashboard = (
        db.Dashboard("Edge MLOps fleet")
        .uid(UID)
        .tags(["edge-mlops", "iot-edge"])
        .refresh("1m")
        .time("now-6h", "now")
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            _variable("ring", "Ring", "label_values(agent_model_info, ring)", multi=True)
        )
        .with_variable(
            _variable(
                "device",
                "Device",
                'label_values(agent_model_info{ring=~"$ring"}, device_id)',
                multi=False,
            )
        )
        .with_variable(
            _variable("model", "Model", "label_values(agent_model_info, model)", multi=False)
        )
    )
    for title, panels in ROWS:
        dashboard.with_row(db.Row(title).id(panel_id(title)))
        for spec in panels:
            dashboard.with_panel(_panel(spec, panel_id(title, spec.title)))
    return dashboard.build()


def panel_id(row: str, title: str | None = None) -> int:
    """The id of a row (`title` None) or of a panel in it: its place in the dashboard, from 1.
    Alert rules link their panel by it (Grafana's `viewPanel=`), so it must stay unique."""
    ids: dict[tuple[str, str | None], int] = {}
    for row_title, specs in ROWS:
        ids[(row_title, None)] = len(ids) + 1
        for spec in specs:
            ids[(row_title, spec.title)] = len(ids) + 1
    return ids[(row, title)]


def panel_url(title: str, row: str = "Fleet overview") -> str:
    """One panel alone, relative to the Grafana server."""
    return f"/d/{UID}/edge-mlops-fleet?viewPanel={panel_id(row, title)}"


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployment.monitoring.dashboard")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args(argv)
    rendered = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != rendered:
            print(f"{args.output} is stale: run python -m deployment.monitoring.dashboard")
            return 1
        return 0
    args.output.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

OUTPUT: Final = Path(__file__).with_name("dashboards") / "edge-fleet.json"
UID: Final = "edge-mlops-fleet"
DATASOURCE: Final = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RING: Final = 'ring=~"$ring"'
DEVICE: Final = 'device_id="$device"'
RATE: Final = "[$__rate_interval]"  # Grafana sizes it to at least four scrapes

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
    unit: str = "short"
    description: str = ""
    width: int = 8


def _q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(" ".join(expr.split()), legend),)


FLEET: Final[tuple[PanelSpec, ...]] = (
    PanelSpec(
        "Devices reporting",
        "stat",
        _q(f'count(group by (hub, device_id) (up{{job="edge-agent", {RING}}})) or vector(0)'),
        width=4,
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
    ),
    PanelSpec(
        "Devices off the hub",
        "stat",
        _q(f"count(agent_hub_connected{{{RING}}} == 0) or vector(0)"),
        width=4,
    ),
    PanelSpec(
        "Alerts firing",
        "table",
        _q(f'sum by (alertname, severity) (ALERTS{{alertstate="firing", {RING}}})'),
        width=12,
    ),
    PanelSpec(
        "Model versions per ring (devices)",
        "table",
        _q(f"count by (ring, model, version) (agent_model_info{{{RING}}})"),
        width=12,
    ),
    PanelSpec(
        "Release outcomes, last 15 minutes (devices)",
        "timeseries",
        _q(
            f"sum by (state) (device:agent_model_updates:increase15m{{{RING}}} > bool 0)",
            "{{state}}",
        ),
        width=12,
    ),
    PanelSpec(
        "Release failures, last 15 minutes, by reason",
        "timeseries",
        _q(
            f"sum by (reason) (device:agent_model_update_failures:increase15m{{{RING}}})",
            "{{reason}}",
        ),
        width=12,
    ),
    PanelSpec(
        "Requests per second by outcome",
        "timeseries",
        _q(
            f"sum by (outcome) (rate(agent_inference_requests_total{{{RING}}}{RATE}))",
            "{{outcome}}",
        ),
        unit="reqps",
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
    ),
    PanelSpec(
        "Devices with the most failed inferences",
        "timeseries",
        _q(f"topk(10, device:agent_inference_error_ratio:rate5m{{{RING}}})", "{{device_id}}"),
        unit="percentunit",
    ),
    PanelSpec(
        "Devices in drift, per model",
        "timeseries",
        _q(f"sum by (model) (agent_drift_state{{{RING}}} == bool 2)", "{{model}}"),
        description="agent_drift_state: 0 ok, 1 warning, 2 drift.",
    ),
    PanelSpec(
        "Drift score, 90th percentile of the fleet",
        "timeseries",
        _q(f"quantile by (model) (0.9, agent_drift_score{{{RING}}})", "{{model}}"),
    ),
    PanelSpec(
        "Accuracy, worst device per model",
        "timeseries",
        _q(f"min by (model) (agent_model_accuracy{{{RING}}})", "{{model}}"),
        unit="percentunit",
    ),
    PanelSpec(
        "Resident memory, largest devices",
        "timeseries",
        _q(
            f'topk(10, process_resident_memory_bytes{{job="edge-agent", {RING}}})',
            "{{device_id}}",
        ),
        unit="bytes",
    ),
    PanelSpec(
        "Memory headroom, tightest devices",
        "timeseries",
        _q(f"bottomk(10, agent_memory_headroom_bytes{{{RING}}})", "{{device_id}}"),
        unit="bytes",
    ),
    PanelSpec(
        "Telemetry dropped by the outbox, last hour",
        "timeseries",
        _q(f"sum by (reason) (increase(agent_outbox_dropped_total{{{RING}}}[1h]))", "{{reason}}"),
    ),
)

DEVICE_PANELS: Final[tuple[PanelSpec, ...]] = (
    PanelSpec(
        "Models served",
        "table",
        _q(f"agent_model_info{{{DEVICE}}}"),
        width=12,
    ),
    PanelSpec(
        "Hub connected",
        "stat",
        _q(f"agent_hub_connected{{{DEVICE}}}"),
        width=4,
    ),
    PanelSpec(
        "Outbox: queued and spooled",
        "timeseries",
        (
            Query(f"agent_outbox_queued{{{DEVICE}}}", "queued"),
            Query(f"agent_outbox_spooled{{{DEVICE}}}", "spooled"),
        ),
        width=8,
    ),
    PanelSpec(
        "Requests per second by outcome",
        "timeseries",
        _q(
            f"sum by (outcome) (rate(agent_inference_requests_total{{{DEVICE}}}{RATE}))",
            "{{outcome}}",
        ),
        unit="reqps",
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
    ),
    PanelSpec(
        "Rejected requests by reason",
        "timeseries",
        _q(
            f"sum by (reason) (rate(agent_inference_rejections_total{{{DEVICE}}}{RATE}))",
            "{{reason}}",
        ),
        unit="reqps",
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
    ),
    PanelSpec(
        "CPU (cores)",
        "timeseries",
        _q(f'rate(process_cpu_seconds_total{{job="edge-agent", {DEVICE}}}{RATE})'),
    ),
    PanelSpec(
        "Memory: resident and headroom",
        "timeseries",
        (
            Query(f'process_resident_memory_bytes{{job="edge-agent", {DEVICE}}}', "resident"),
            Query(f"agent_memory_headroom_bytes{{{DEVICE}}}", "headroom"),
        ),
        unit="bytes",
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
    ),
    PanelSpec(
        "Drift score per model",
        "timeseries",
        _q(f"agent_drift_score{{{DEVICE}}}", "{{model}}"),
    ),
)

MODEL_PANELS: Final[tuple[PanelSpec, ...]] = (
    PanelSpec(
        "Versions of $model across the fleet (devices)",
        "timeseries",
        _q(f'count by (version) (agent_model_info{{model="$model", {RING}}})', "v{{version}}"),
    ),
    PanelSpec(
        "Devices in drift on $model, per ring",
        "timeseries",
        _q(f'sum by (ring) (agent_drift_state{{model="$model", {RING}}} == bool 2)', "{{ring}}"),
    ),
    PanelSpec(
        "Drift score of $model: median and 90th percentile",
        "timeseries",
        tuple(
            Query(
                f'quantile({q}, agent_drift_score{{model="$model", {RING}}})', f"p{round(q * 100)}"
            )
            for q in (0.5, 0.9)
        ),
    ),
    PanelSpec(
        "Accuracy of $model per ring",
        "timeseries",
        _q(f'avg by (ring) (agent_model_accuracy{{model="$model", {RING}}})', "{{ring}}"),
        unit="percentunit",
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


def _panel(spec: PanelSpec) -> timeseries.Panel | stat.Panel | table.Panel:
    builder: timeseries.Panel | stat.Panel | table.Panel
    if spec.kind == "timeseries":
        builder = timeseries.Panel()
    elif spec.kind == "stat":
        builder = stat.Panel()
    else:
        builder = table.Panel()
    builder.title(spec.title).unit(spec.unit).span(spec.width).height(8).datasource(DATASOURCE)
    if spec.description:
        builder.description(spec.description)
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
        dashboard.with_row(db.Row(title))
        for spec in panels:
            dashboard.with_panel(_panel(spec))
    return dashboard.build()


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

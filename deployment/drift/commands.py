"""The drift commands of the cloud CLI: ``baseline`` (a model's drift baseline pack from its
training data) and ``drift-report`` (fleet window profiles merged into HTML pages)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import structlog

from deployment.drift.baseline_pack import (
    BaselineOptions,
    build_baseline,
    load_table,
    model_outputs,
    window_sizes_arg,
)
from deployment.drift.report import (
    Profile,
    load_baselines,
    merge_profiles,
    read_blob_profiles,
    read_profiles,
    write_reports,
)
from deployment.errors import PublisherError, Reason

log = structlog.get_logger("deployment")


def _baseline(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    data, header = load_table(args.data)
    options = BaselineOptions(
        bins=args.bins,
        max_features=args.max_features,
        window_sizes=args.window_sizes,
        false_alarms_per_10k=args.false_alarms_per_10k,
        resamples=args.resamples,
        seed=args.seed,
    )
    input_name, outputs = model_outputs(args.model, data)
    names = {input_name: header} if header else {}
    labels = load_table(args.labels)[0] if args.labels else None
    pack = build_baseline({input_name: data}, outputs, options, names, labels)
    args.output.write_text(json.dumps(pack, separators=(",", ":")), encoding="utf-8")
    log.info(
        "baseline_written",
        path=str(args.output),
        rows=pack["rows"],
        features=len(pack["features"]),
        skipped=len(pack["skipped"]),
        windows=[w["rows"] for w in pack["calibration"]["windows"]],
    )
    return 0


def _drift_report(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if not args.profiles and not args.container:
        raise ValueError("give --profiles, --container, or both")
    profiles = read_profiles(args.profiles or [])
    if args.container:
        connection = environ.get(args.connection_string_env)
        if not connection:
            raise ValueError(f"set {args.connection_string_env} to read container {args.container}")
        profiles += _container_profiles(connection, args.container, args.prefix)
    fleet = merge_profiles(profiles, load_baselines(args.baseline), args.bucket_seconds)
    written = write_reports(fleet, args.output, args.bucket_seconds)
    log.info("drift_report_written", profiles=len(profiles), pages=[str(p) for p in written])
    for path in written:
        print(f"wrote {path}")
    return 0 if fleet else 1


def _container_profiles(connection: str, name: str, prefix: str) -> list[Profile]:

    from azure.core.exceptions import AzureError, ResourceNotFoundError  # noqa: PLC0415
    from azure.storage.blob import ContainerClient  # noqa: PLC0415

    try:
        with ContainerClient.from_connection_string(connection, name) as container:
            return read_blob_profiles(container, prefix)
    except ResourceNotFoundError as e:
        raise PublisherError(
            Reason.NOT_FOUND, f"Blob container {name!r} does not exist in that storage account"
        ) from e
    except AzureError as e:
        # The SDK's message spans many lines; the first says what went wrong.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PublisherError(
            Reason.UNREACHABLE, f"cannot read Blob container {name!r}: {first}"
        ) from e


COMMANDS = frozenset({"baseline", "drift-report"})


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = BaselineOptions()
    baseline = commands.add_parser("baseline", help="profile training data into a drift baseline")
    baseline.add_argument("--data", type=Path, required=True, help="training inputs, .npy or .csv")
    baseline.add_argument("--model", type=Path, required=True, help="the ONNX model")
    baseline.add_argument("-o", "--output", type=Path, required=True)
    baseline.add_argument(
        "--labels", type=Path, help="training labels (.npy/.csv), for the quality reference"
    )
    baseline.add_argument("--bins", type=int, default=defaults.bins)
    baseline.add_argument("--max-features", type=int, default=defaults.max_features)
    baseline.add_argument(
        "--window-sizes",
        type=window_sizes_arg,
        default=defaults.window_sizes,
        help="comma-separated rows per window to calibrate",
    )
    baseline.add_argument(
        "--false-alarms-per-10k", type=float, default=defaults.false_alarms_per_10k
    )
    baseline.add_argument("--resamples", type=int, default=defaults.resamples)
    baseline.add_argument("--seed", type=int, default=defaults.seed)
    baseline.set_defaults(drift_run=_baseline)

    report = commands.add_parser("drift-report", help="merge fleet drift profiles into HTML")
    report.add_argument("--profiles", type=Path, nargs="+", help="routed telemetry files/folders")
    report.add_argument("--container", help="a Blob container that IoT Hub routes telemetry to")
    report.add_argument("--prefix", default="", help="only blobs under this prefix")
    report.add_argument(
        "--connection-string-env",
        default="AZURE_STORAGE_CONNECTION_STRING",
        help="the variable holding the storage connection string (never a flag: it is a secret)",
    )
    report.add_argument(
        "--baseline", type=Path, nargs="+", required=True, help="the baseline packs they name"
    )
    report.add_argument("--bucket-seconds", type=float, default=3600.0)
    report.add_argument("-o", "--output", type=Path, required=True, help="folder for the pages")
    report.set_defaults(drift_run=_drift_report)


def run(args: argparse.Namespace, environ: Mapping[str, str], stderr: IO[str]) -> int:
    """One drift command; 2 with the problem on `stderr` when an input is unusable."""
    try:
        return int(args.drift_run(args, environ))
    except (ValueError, OSError) as e:
        print(f"edgeml: error: {e}", file=stderr)
        return 2

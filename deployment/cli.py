"""``python -m deployment`` / ``edgeml``: the publisher's command line.

Exit status: 0 done, 1 a command failed (the message names what and why, prefixed by a
bounded reason), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import structlog
from rich.console import Console

from agent.logs import configure_logging
from agent.releases.manifest import KeyConfigError, parse_trusted_keys
from deployment import config, library_logs
from deployment import dev as dev_fleet
from deployment.drift import commands as drift_commands
from deployment.errors import PublisherError, Reason
from deployment.publish import gate, rollout, signing, template
from deployment.retrain import commands as retrain_commands
from wire.version import version_text

if TYPE_CHECKING:
    from deployment.publish.publisher import HubFactory, Publisher, Services

log = structlog.get_logger(__name__)


def _positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from e
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def _rings(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ring names separated by commas")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeml",
        description="Publish models to an IoT Edge fleet: register, sign, upload, release.",
    )
    parser.add_argument("--version", action="version", version=version_text("edgeml"))
    parser.add_argument(
        "--config", type=Path, help=f"environments file (${config.CONFIG_VARIABLE})"
    )
    parser.add_argument("--env", help=f"environment name (${config.ENVIRONMENT_VARIABLE})")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _registry_commands(commands)
    _rollout_commands(commands)
    _other_commands(commands)
    retrain_commands.add_parsers(commands, _positive, _fraction, _rings)
    drift_commands.add_commands(commands)
    dev = commands.add_parser(
        "dev", help="a local simulated fleet: dev up|status|down [--run-dir run/dev]"
    )
    dev.add_argument("dev_args", nargs=argparse.REMAINDER, metavar="up|status|down ...")
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _registry_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = commands.add_parser("keygen", help="a new Ed25519 signing key")
    keygen.add_argument("--out", type=Path, required=True, help="folder for <key_id>.key/.pem")

    register = commands.add_parser("register", help="register MODEL.onnx in MLflow")
    register.add_argument("model", type=Path)
    register.add_argument("--metrics", type=Path, required=True, help="JSON object of numbers")
    register.add_argument("--name", help="registered model name (default: the file's stem)")
    register.add_argument("--baseline", type=Path, help="drift baseline JSON")
    register.add_argument("--run", dest="run_id", help="the MLflow run that trained it")
    register.add_argument(
        "--version", type=_positive(int), help="fail unless this is the version assigned"
    )

    listing = commands.add_parser("list", help="registered models")
    show = commands.add_parser("show", help="one version")
    show.add_argument("ref", metavar="NAME[:VERSION]")
    history = commands.add_parser("history", help="every version of a model")
    history.add_argument("name")
    for parser in (listing, show, history):
        _json_flag(parser)


def _rollout_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    upload = commands.add_parser("upload", help="artifact to Azure Blob, hash checked")
    upload.add_argument("ref", metavar="NAME:VERSION")
    sign = commands.add_parser("sign", help="sign the release manifest")
    sign.add_argument("ref", metavar="NAME:VERSION")
    sign.add_argument("--url", help="artifact URL (default: a SAS URL of the uploaded blob)")
    sign.add_argument("--valid-hours", type=_positive(float))
    refresh = commands.add_parser("refresh-url", help="re-sign with a fresh SAS URL")
    refresh.add_argument("ref", metavar="NAME:VERSION")
    refresh.add_argument("--valid-hours", type=_positive(float))

    release = commands.add_parser("release", help="roll out through the rings, gated")
    release.add_argument("ref", metavar="NAME:VERSION")
    release.add_argument("--rings", type=_rings, required=True, help="e.g. canary,all")
    release.add_argument("--dry-run", action="store_true", help="print the plan only")
    defaults = gate.GateBounds()
    release.add_argument("--min-fraction", type=_fraction, default=defaults.min_fraction)
    release.add_argument("--max-error-rate", type=_fraction, default=defaults.max_error_rate)
    release.add_argument("--max-p99-ratio", type=_positive(float), default=defaults.max_p99_ratio)
    release.add_argument("--timeout", type=_positive(float), default=defaults.timeout_s)
    release.add_argument("--poll", type=_positive(float), default=defaults.poll_s)
    release.add_argument(
        "--allow-no-traffic",
        action="store_true",
        help="accept devices whose probation ended without its minimum of requests "
        "(passed_without_traffic); by default such a ring fails its gate",
    )


def _other_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollback = commands.add_parser(
        "rollback", help="ask a ring's devices to go back to their last known good version"
    )
    rollback.add_argument("name", help="the model")
    rollback.add_argument("--ring", help="one ring of the environment (default: every ring)")

    status = commands.add_parser("status", help="the fleet, from twin queries")
    status.add_argument("name", nargs="?")
    _json_flag(status)
    status.add_argument(
        "--repair", action="store_true", help="first finish halts a killed run left unfinished"
    )

    audit = commands.add_parser("audit", help="the hash-chained audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_commands.add_parser("verify", help="check every link of the chain")
    audit_show = audit_commands.add_parser("show", help="the entries")
    audit_show.add_argument("subject", nargs="?", help="e.g. NAME:VERSION")
    _json_flag(audit_show)

    manifest = commands.add_parser("manifest", help="render the base deployment manifest")
    manifest.add_argument("--image", required=True, help="the agent module's image")
    manifest.add_argument(
        "--module-image", action="append", default=[], metavar="NAME=IMAGE", help="other modules"
    )
    keys = manifest.add_mutually_exclusive_group(required=True)
    keys.add_argument("--trusted-keys", help="EDGEML_TRUSTED_KEYS value (keygen prints it)")
    keys.add_argument("--trusted-keys-dir", type=Path, help="folder of <key_id>.pem files")
    manifest.add_argument(
        "--set",
        dest="values",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ${NAME} placeholder (credentials come from variables of the same name)",
    )
    manifest.add_argument("--profile", type=Path, help="profile.json of python -m agent profile")
    manifest.add_argument("--template", type=Path, default=template.TEMPLATE)
    manifest.add_argument("--out", type=Path, required=True)


def _trusted_keys(args: argparse.Namespace) -> str:
    if args.trusted_keys is not None:
        try:
            parse_trusted_keys(args.trusted_keys)
        except KeyConfigError as e:
            raise PublisherError(Reason.KEY_INVALID, f"--trusted-keys: {e}") from e
        return str(args.trusted_keys)
    return signing.trusted_keys_entries(sorted(Path(args.trusted_keys_dir).glob("*.pem")))


def _images(args: argparse.Namespace) -> dict[str, str]:
    images = {template.AGENT_MODULE: args.image}
    for item in args.module_image:
        name, sep, image = item.partition("=")
        if not sep or not name or not image:
            raise PublisherError(Reason.USAGE, f"--module-image {item!r}: expected NAME=IMAGE")
        images[name] = image
    return images


def _values(
    args: argparse.Namespace, loaded: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in args.values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PublisherError(Reason.USAGE, f"--set {item!r}: expected NAME=VALUE")
        if template.is_secret_placeholder(name):
            raise PublisherError(
                Reason.USAGE, f"--set {name}: a credential comes from the variable {name}"
            )
        values[name] = value
    for name in sorted(template.required_placeholders(loaded)):
        if template.is_secret_placeholder(name) and name not in values:
            # A missing one is left out: render names every missing value in one error,
            # rather than one per run.
            try:
                values[name] = config.secret(name, None, environ)
            except PublisherError as e:
                if e.reason != Reason.SECRET_MISSING:
                    raise
    return values


def run(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str],
    stdout: TextIO,
    stderr: TextIO,
    hub_factory: HubFactory | None = None,
    logs: bool = True,
) -> int:
    """One command; ``logs=False`` leaves structlog's global set-up alone (in-process tests)."""
    parser = _parser()
    try:
        # argparse writes usage and errors to sys.stdout/stderr: point those at our streams.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse has printed the usage and the error
        return int(e.code or 0)
    if args.command == "dev":
        return dev_fleet.run(args.dev_args, stdout=stdout, stderr=stderr)
    if logs:
        configure_logging(args.log_level, stream=stderr)
        library_logs.route(args.log_level)
    out = Console(file=stdout, width=200, soft_wrap=True)
    err = Console(file=stderr, width=200)
    try:
        return _dispatch(args, environ, out, err, hub_factory)
    except PublisherError as e:
        # One line whatever its length: scripts read the reason off the first line.
        err.print(
            f"edgeml: error [{e.reason}]: {e.message}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 1


def _dispatch(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    out: Console,
    err: Console,
    hub_factory: HubFactory | None,
) -> int:
    if args.command in drift_commands.COMMANDS:
        return drift_commands.run(args, environ, err.file)
    if args.command == "keygen":
        generated = signing.generate(args.out)
        out.print(f"key id: {generated.key_id}", markup=False)
        out.print(f"private key (mode 0600, keep secret): {generated.private_file}", markup=False)
        out.print(f"public key for EDGEML_TRUSTED_KEYS_DIR: {generated.public_file}", markup=False)
        out.print(f"EDGEML_TRUSTED_KEYS={generated.trusted_keys_entry}", markup=False)
        return 0
    if args.command == "manifest":
        profile = template.load_profile(args.profile) if args.profile else None
        loaded = template.load_template(args.template)
        rendered = template.render(
            loaded,
            images=_images(args),
            trusted_keys=_trusted_keys(args),
            settings=_values(args, loaded, environ),
            profile=profile,
        )
        # It may hold credentials (a Log Analytics key): owner-only, like the other secrets.
        descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(json.dumps(rendered, indent=2) + "\n")
        out.print(f"wrote {args.out}", markup=False)
        return 0
    # Imported here: the registry brings MLflow and the Azure SDKs, a second or more of
    # start-up that keygen, manifest and --help do not need.
    from deployment.publish.publisher import Publisher, Services, _azure_hub  # noqa: PLC0415

    resolved = config.load(args.config, args.env, environ)
    services = Services(resolved, environ=environ, hub_factory=hub_factory or _azure_hub)
    publisher = Publisher(services, out, err)
    if getattr(args, "json", False):
        json.dump(_json_document(args, services), out.file, indent=2)
        out.file.write("\n")
        return 0
    if args.command == "rollback":
        return _rollback(args, services, out)
    if args.command in retrain_commands.COMMANDS:
        retrain_commands.dispatch(args, services, publisher, out)
    else:
        _COMMANDS[args.command](publisher, args)
    return 0


def _json_document(args: argparse.Namespace, services: Services) -> object:
    from deployment.publish import json_views  # noqa: PLC0415 - with the publisher

    if args.command == "list":
        return json_views.models(services.registry())
    if args.command == "show":
        return json_views.show(services.registry(), args.ref)
    if args.command == "history":
        return json_views.history(services.registry(), args.name)
    if args.command == "status":
        if args.repair:
            raise PublisherError(Reason.USAGE, "status --repair writes: run it without --json")
        env = services.resolved.env
        return json_views.status(services.hub(), module=env.module, rings=env.rings, name=args.name)
    return json_views.audit(services.audit, args.subject)


def _rollback(args: argparse.Namespace, services: Services, out: Console) -> int:
    from deployment.publish import fleet_rollback  # noqa: PLC0415 - with the publisher

    rollout.check_model_name(args.name)
    rings = fleet_rollback.ring_conditions(services.resolved.env.rings, args.ring)

    def report(o: fleet_rollback.DeviceOutcome) -> None:
        mark = "ok" if o.ok else "FAILED"
        out.print(f"{o.device} ({o.ring}): {mark} {o.detail}", markup=False, highlight=False)

    fleet_rollback.roll_back(
        services.hub(),
        services.audit,
        module=services.resolved.env.module,
        model=args.name,
        rings=rings,
        report=report,
    )
    return 0


def _release(publisher: Publisher, args: argparse.Namespace) -> None:
    bounds = gate.GateBounds(
        min_fraction=args.min_fraction,
        max_error_rate=args.max_error_rate,
        max_p99_ratio=args.max_p99_ratio,
        timeout_s=args.timeout,
        poll_s=args.poll,
        allow_no_traffic=args.allow_no_traffic,
    )
    publisher.release(args.ref, args.rings, bounds, dry_run=args.dry_run)


def _audit(publisher: Publisher, args: argparse.Namespace) -> None:
    if args.audit_command == "verify":
        publisher.audit_verify()
    else:
        publisher.audit_show(args.subject)


_COMMANDS: dict[str, Callable[[Publisher, argparse.Namespace], object]] = {
    "register": lambda p, a: p.register(
        a.model,
        name=a.name,
        metrics_path=a.metrics,
        baseline=a.baseline,
        run_id=a.run_id,
        version=a.version,
    ),
    "list": lambda p, a: p.list_models(),
    "show": lambda p, a: p.show(a.ref),
    "history": lambda p, a: p.history(a.name),
    "upload": lambda p, a: p.upload(a.ref),
    "sign": lambda p, a: p.sign(a.ref, url=a.url, valid_hours=a.valid_hours),
    "refresh-url": lambda p, a: p.refresh_url(a.ref, valid_hours=a.valid_hours),
    "release": _release,
    "status": lambda p, a: p.status(a.name, repair=a.repair),
    "audit": _audit,
}


def main() -> None:
    sys.exit(run(sys.argv[1:], environ=os.environ, stdout=sys.stdout, stderr=sys.stderr))

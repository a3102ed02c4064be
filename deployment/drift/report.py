"""Fleet drift: merge window profiles from many devices and hours, score the merged counts,
and draw one self-contained HTML page per model.

``python -m deployment drift-report --profiles DIR_OR_FILE... --baseline pack.json... -o DIR``

Profiles are the agent's ``telemetry`` messages (schema ``agent-drift-profile/1``), read from
files as IoT Hub message routing writes them to storage: one JSON object, a JSON array, or one
object per line, either bare or in a routing envelope (``Body`` plus ``SystemProperties``).
Counts of the same baseline add up, so a bucket of an hour across a fleet is scored exactly as
one window of all its rows would be.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.observation.baseline import (
    MAX_BASELINE_BYTES,
    BaselineInvalidError,
    BaselinePack,
    parse_baseline,
    score_window,
)
from agent.observation.counts import FeatureCounts
from agent.observation.drift import PROFILE_SCHEMA
from deployment.errors import PublisherError, Reason
from wire.bounded_json import BoundedJsonError, JsonLimits, Problem, loads

if TYPE_CHECKING:  # the SDK is imported by the command that reads a container
    from azure.storage.blob import ContainerClient

__all__ = [
    "Bucket",
    "FleetModel",
    "load_baselines",
    "merge_profiles",
    "page_name",
    "read_blob_profiles",
    "read_profiles",
    "render_html",
    "verdict",
    "write_reports",
]


@dataclass(frozen=True)
class Profile:
    device: str
    model: str
    version: int
    baseline: str
    seq: int
    ended: float
    rows: int
    state: str
    features: Mapping[str, Mapping[str, Any]]


# A routed blob or file holds an hour of a fleet's telemetry; one record is one message
# (IoT Hub's 256 KB, base64 in an envelope) nested a few levels (features, their counts).
MAX_FILE_BYTES = 512 * 1024 * 1024
FILE_LIMITS = JsonLimits(max_bytes=MAX_FILE_BYTES, max_depth=16)
RECORD_LIMITS = JsonLimits(max_bytes=1024 * 1024, max_depth=16)


def _iter_documents(data: str | bytes, where: str) -> Iterator[Any]:
    text = (data.encode() if isinstance(data, str) else data).strip()
    if not text:
        return
    try:
        document = loads(text, FILE_LIMITS)
    except BoundedJsonError as error:
        if error.problem is not Problem.NOT_JSON:
            raise PublisherError(Reason.PROFILE_INVALID, f"{where}: {error}") from None
        # Not one document: one record per line, as message routing writes them.
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield _record(line, f"{where} line {number}")
        return
    if isinstance(document, list):
        yield from document
    else:
        yield document


def _profile(document: Any, where: str) -> Profile | None:
    if not isinstance(document, dict):
        return None
    device = "unknown"
    if "Body" in document:
        system = document.get("SystemProperties") or {}
        device = str(system.get("connectionDeviceId", device))
        document = document["Body"]
        if isinstance(document, str):  # routing stores a body not sent as JSON in base64
            try:
                document = _record(base64.b64decode(document, validate=True), where)
            except (ValueError, PublisherError):  # not base64, or not JSON: not a profile
                return None
        if not isinstance(document, dict):
            return None
    if document.get("schema") != PROFILE_SCHEMA:
        return None
    try:
        return Profile(
            device=str(document.get("device", device)),
            model=str(document["model"]),
            version=int(document["version"]),
            baseline=str(document["baseline"]),
            seq=int(document["seq"]),
            ended=float(document["ended"]),
            rows=int(document["rows"]),
            state=str(document["state"]),
            features=dict(document["features"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PublisherError(
            Reason.PROFILE_INVALID, f"{where}: malformed drift profile ({e})"
        ) from None


def _record(line: str | bytes, where: str) -> Any:
    try:
        return loads(line, RECORD_LIMITS)
    except BoundedJsonError as error:
        raise PublisherError(Reason.PROFILE_INVALID, f"{where}: {error.problem}: {error}") from None


def _profiles_in(text: str | bytes, where: str) -> list[Profile]:
    profiles = []
    for document in _iter_documents(text, where):
        profile = _profile(document, where)
        if profile is not None:
            profiles.append(profile)
    return profiles


def read_blob_profiles(container: ContainerClient, prefix: str = "") -> list[Profile]:
    """Every drift profile in the blobs under `prefix` of a container, as IoT Hub message
    routing writes them (one JSON record per line)."""
    profiles = []
    for blob in container.list_blobs(name_starts_with=prefix or None):
        if blob.size is not None and blob.size > MAX_FILE_BYTES:
            raise PublisherError(Reason.PROFILE_INVALID, f"{blob.name}: {_too_large(blob.size)}")
        profiles += _profiles_in(container.download_blob(blob.name).readall(), blob.name)
    return profiles


def read_profiles(paths: Iterable[Path]) -> list[Profile]:
    """Every drift profile in the files (folders are read recursively); other messages are
    ignored, since routed telemetry mixes message kinds."""
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    profiles = []
    for file in files:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PublisherError(Reason.PROFILE_INVALID, f"{file}: {_too_large(size)}")
        profiles += _profiles_in(file.read_bytes(), str(file))
    return profiles


def _too_large(size: int) -> str:
    return f"too_large: {size} bytes, over the limit of {MAX_FILE_BYTES}"


def load_baselines(paths: Iterable[Path]) -> dict[str, BaselinePack]:
    """Baseline packs by the sha256 of their bytes (what profiles and manifests name)."""
    packs = {}
    for path in paths:
        with path.open("rb") as file:  # no more than a pack may hold: the parser refuses it
            data = file.read(MAX_BASELINE_BYTES + 1)
        try:
            packs[hashlib.sha256(data).hexdigest()] = parse_baseline(data)
        except BaselineInvalidError as e:
            raise PublisherError(Reason.BASELINE_INVALID, f"{path}: {e}") from None
    return packs


def _counts(pack: BaselinePack, sparse: Mapping[str, Any], index: int) -> FeatureCounts:
    size = pack.features[index].binning.size
    if int(sparse["bins"]) != size:
        raise ValueError(f"{sparse['bins']} bins where the baseline has {size}")
    counts = np.zeros(size, dtype=np.int64)
    np.add.at(counts, np.asarray(sparse["i"], dtype=np.int64), np.asarray(sparse["c"]))
    return FeatureCounts(
        counts, float(sparse["sum"]), float(sparse["sum_sq"]), int(sparse["below"]),
        int(sparse["above"]),
    )  # fmt: skip


@dataclass
class Bucket:
    start: float
    rows: int = 0
    profiles: int = 0
    devices: set[str] = field(default_factory=set)
    counts: dict[int, FeatureCounts] = field(default_factory=dict)
    score: float = float("nan")
    divergence: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass
class FleetModel:
    model: str
    baseline: str
    pack: BaselinePack
    versions: set[int] = field(default_factory=set)
    buckets: list[Bucket] = field(default_factory=list)
    total: Bucket = field(default_factory=lambda: Bucket(0.0))
    changes: list[tuple[float, str, int, str, str]] = field(default_factory=list)


def _add(bucket: Bucket, profile: Profile, pack: BaselinePack) -> None:
    names = {f.name: i for i, f in enumerate(pack.features)}
    bucket.rows += profile.rows
    bucket.profiles += 1
    bucket.devices.add(profile.device)
    for name, sparse in profile.features.items():
        index = names.get(name)
        if index is None:
            continue  # a feature the pack does not know cannot be scored
        part = _counts(pack, sparse, index)
        bucket.counts[index] = bucket.counts[index] + part if index in bucket.counts else part


def _score(bucket: Bucket, pack: BaselinePack) -> None:
    if not bucket.counts:
        return
    counts = [
        bucket.counts.get(i, FeatureCounts.empty(f.binning.size))
        for i, f in enumerate(pack.features)
    ]
    score = score_window(pack, counts)
    present = [i for i in range(len(counts)) if i in bucket.counts]
    bucket.score = max((score.features[i].evidence for i in present), default=float("nan"))
    bucket.divergence = {score.features[i].name: score.features[i].divergence for i in present}
    bucket.evidence = {
        score.features[i].name: score.features[i].evidence
        for i in present
        if math.isfinite(score.features[i].evidence)
    }


def merge_profiles(
    profiles: Sequence[Profile], baselines: Mapping[str, BaselinePack], bucket_s: float
) -> list[FleetModel]:
    """Profiles merged per (model, baseline) and time bucket; state changes per device."""
    models: dict[tuple[str, str], FleetModel] = {}
    buckets: dict[tuple[str, str], dict[float, Bucket]] = defaultdict(dict)
    missing = sorted({p.baseline for p in profiles if p.baseline not in baselines})
    if missing:
        raise ValueError(f"no baseline given for {', '.join(s[:12] for s in missing)}")
    last_state: dict[tuple[str, str, int], str] = {}
    for profile in sorted(profiles, key=lambda p: (p.ended, p.device, p.seq)):
        key = (profile.model, profile.baseline)
        pack = baselines[profile.baseline]
        fleet = models.setdefault(key, FleetModel(profile.model, profile.baseline, pack))
        fleet.versions.add(profile.version)
        start = math.floor(profile.ended / bucket_s) * bucket_s
        _add(buckets[key].setdefault(start, Bucket(start)), profile, pack)
        _add(fleet.total, profile, pack)
        release = (profile.device, profile.model, profile.version)
        before = last_state.get(release, "ok")
        if profile.state != before:
            fleet.changes.append(
                (profile.ended, profile.device, profile.version, before, profile.state)
            )
        last_state[release] = profile.state
    for key, fleet in models.items():
        fleet.buckets = [buckets[key][s] for s in sorted(buckets[key])]
        for bucket in [*fleet.buckets, fleet.total]:
            _score(bucket, fleet.pack)
    return sorted(models.values(), key=lambda m: (m.model, m.baseline))


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#1d2733;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.card{border:1px solid #d5dbe3;border-radius:8px;padding:10px}
.card h3{font-size:14px;margin:0 0 4px}.muted{color:#5c6b7a;font-size:12px}
table{border-collapse:collapse}
td,th{padding:3px 10px;border-bottom:1px solid #e3e8ee;text-align:left}
.verdict{font-size:18px;font-weight:600;margin:8px 0}
.ok{color:#1a7f37}.warning{color:#b35900}.drift{color:#c62828;font-weight:600}
"""
_REFERENCE, _CURRENT = "#8aa4c8", "#e4572e"


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _tick_format(span_s: float, bucket_s: float) -> str:
    """A time format fine enough that neighbouring buckets get different labels."""
    if bucket_s < 60:
        return "%H:%M:%S"
    if span_s < 86_400:
        return "%H:%M"
    return "%m-%d %H:%M"


def _threshold(fleet: FleetModel) -> tuple[float, str] | None:
    """Where one window's evidence alone crosses the device's alarm, from the pack's calibration
    for the smallest window (CUSUM: a window adds at most `clip` - `k`, and alarms at `h`)."""
    window = fleet.pack.calibration.windows[0]
    alone = window.h + window.k
    if alone <= window.clip:
        return alone, f"one window above {alone:.2f} alarms on its own (h + k)"
    return window.clip, (
        f"one window adds at most {window.clip:.1f} (clip) toward the alarm level {window.h:.1f}"
    )


_STATE_COLOURS = {"drift": "#c62828", "warning": "#b35900", "ok": "#1a7f37"}


@dataclass(frozen=True)
class Verdict:
    """What a reader of the page must learn first: who is in drift, since when, and why."""

    drifting: dict[str, float]  # device -> when it last entered drift
    warning: list[str]
    features: list[str]  # the features that drove the latest scored bucket, strongest first

    @property
    def headline(self) -> str:
        if self.drifting:
            return f"In drift on {len(self.drifting)} device(s)"
        if self.warning:
            return f"Warning on {len(self.warning)} device(s)"
        return "No drift"


def verdict(fleet: FleetModel) -> Verdict:
    """Each device's last reported state (the profiles' own), and the features with the most
    evidence in the last scored bucket."""
    state: dict[str, tuple[str, float]] = {}
    for t, device, _, _, new in fleet.changes:
        state[device] = (new, t)
    drifting = {d: since for d, (s, since) in sorted(state.items()) if s == "drift"}
    warning = sorted(d for d, (s, _) in state.items() if s == "warning")
    scored = [b for b in fleet.buckets if b.evidence]
    latest = scored[-1].evidence if scored else {}
    strongest = sorted(latest, key=lambda name: -latest[name])
    return Verdict(drifting, warning, [n for n in strongest if latest[n] > 0][:3])


def _verdict_html(fleet: FleetModel, found: Verdict) -> str:
    css = "drift" if found.drifting else "warning" if found.warning else "ok"
    parts = [f'<p class="verdict {css}">{html.escape(found.headline)}</p><ul>']
    for device, since in found.drifting.items():
        parts.append(f"<li>{html.escape(device)}: drift since {_time(since)} UTC</li>")
    if found.warning:
        parts.append(f"<li>warning: {html.escape(', '.join(found.warning))}</li>")
    if found.features:
        names = ", ".join(html.escape(n) for n in found.features)
        parts.append(f"<li>driven by {names} (most evidence in the latest bucket)</li>")
    parts.append("</ul>")
    return "".join(parts)


def _histogram(reference: Sequence[float], current: Sequence[float], labels: Sequence[str]) -> str:
    width, height, pad = 320, 150, 22
    bins = len(reference)
    step = (width - 2 * pad) / max(1, bins)
    top = max([*reference, *current, 1e-9])
    bars = []
    for i, (ref, cur) in enumerate(zip(reference, current, strict=True)):
        x = pad + i * step
        for offset, value, colour in ((0.0, ref, _REFERENCE), (step / 2, cur, _CURRENT)):
            h = (height - 2 * pad) * value / top
            bars.append(
                f'<rect x="{x + offset:.1f}" y="{height - pad - h:.1f}" '
                f'width="{max(step / 2 - 1, 1):.1f}" height="{h:.1f}" fill="{colour}"/>'
            )
    axis = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#5c6b7a"/>'
        f'<text x="{pad}" y="{height - 6}" font-size="10" fill="#5c6b7a">'
        f"{html.escape(labels[0])}</text>"
        f'<text x="{width - pad}" y="{height - 6}" font-size="10" fill="#5c6b7a" '
        f'text-anchor="end">{html.escape(labels[-1])}</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}{axis}</svg>'


def _timeline(fleet: FleetModel, bucket_s: float) -> str:
    width, height = 900, 260
    left, right, top_pad, bottom = 56, 20, 24, 44
    points = [(b.start, b.score) for b in fleet.buckets if math.isfinite(b.score)]
    if not points:
        return '<p class="muted">no scored bucket</p>'
    line = _threshold(fleet)
    t0 = min(p[0] for p in points)
    t1 = max(t0 + 1, *(p[0] for p in points))
    top = max(4.0, *(p[1] for p in points), (line[0] if line else 0.0) * 1.1)
    low = min(0.0, *(p[1] for p in points))

    def x(t: float) -> float:
        return left + (width - left - right) * (t - t0) / (t1 - t0)

    def y(v: float) -> float:
        return height - bottom - (height - top_pad - bottom) * (v - low) / (top - low)

    grey = 'fill="#5c6b7a" font-size="11"'
    y_axis = [
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{height - bottom}" stroke="#5c6b7a"/>'
    ]
    step = max(1, math.ceil((top - low) / 5))
    for v in range(math.floor(low), math.ceil(top) + 1, step):
        y_axis.append(
            f'<line x1="{left - 4}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" '
            f'stroke="#eef1f5"/><text x="{left - 8}" y="{y(v) + 4:.1f}" {grey} '
            f'text-anchor="end">{v}</text>'
        )
    y_axis.append(
        f'<text x="14" y="{(height - bottom + top_pad) / 2:.1f}" {grey} text-anchor="middle" '
        f'transform="rotate(-90 14 {(height - bottom + top_pad) / 2:.1f})">evidence (sd)</text>'
    )
    fmt = _tick_format(t1 - t0, bucket_s)
    stride = max(1, math.ceil(len(points) / 8))
    x_axis = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        'stroke="#5c6b7a"/>'
    ]
    for t, _ in points[::stride]:
        label = datetime.fromtimestamp(t, UTC).strftime(fmt)
        x_axis.append(
            f'<text x="{x(t):.1f}" y="{height - bottom + 16}" {grey} text-anchor="middle">'
            f"{label}</text>"
        )
    x_axis.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" {grey} '
        f'text-anchor="middle">bucket start (UTC), {_time(t0)[:10]}</text>'
    )
    threshold = ""
    if line is not None:
        threshold = (
            f'<line x1="{left}" y1="{y(line[0]):.1f}" x2="{width - right}" y2="{y(line[0]):.1f}" '
            'stroke="#c62828" stroke-width="1.5"/>'
            f'<text x="{width - right}" y="{y(line[0]) - 5:.1f}" font-size="11" fill="#c62828" '
            f'text-anchor="end">{html.escape(line[1])}</text>'
        )
    path = " ".join(
        f"{'M' if i == 0 else 'L'}{x(t):.1f},{y(v):.1f}" for i, (t, v) in enumerate(points)
    )
    dots = "".join(
        f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{_CURRENT}"/>' for t, v in points
    )
    marks = "".join(
        f'<line x1="{x(t):.1f}" y1="{top_pad}" x2="{x(t):.1f}" y2="{height - bottom}" '
        f'stroke="{_STATE_COLOURS.get(new, "#5c6b7a")}" stroke-dasharray="4 3"/>'
        for t, _, _, _, new in fleet.changes
        if t0 <= t <= t1 + 1
    )
    svg = (
        f'<svg width="{width}" height="{height}" role="img">{"".join(y_axis)}{"".join(x_axis)}'
        f'{threshold}{marks}<path d="{path}" fill="none" stroke="{_CURRENT}" stroke-width="2"/>'
        f"{dots}</svg>"
    )
    legend = " ".join(
        f'<span style="color:{colour}">┆</span> a device entered {state}'
        for state, colour in _STATE_COLOURS.items()
    )
    return (
        f'{svg}<p class="muted"><span style="color:{_CURRENT}">●</span> largest feature '
        "evidence in the bucket (standard deviations above what training windows score) · "
        f'<span style="color:#c62828">—</span> alarm threshold · {legend}</p>'
    )


def _bin_labels(pack: BaselinePack, index: int) -> list[str]:
    feature = pack.features[index]
    cuts = [f"{c:.3g}" for c in feature.cuts]
    if feature.kind == "categorical":
        return [*cuts, "other", "missing"]
    return [f"< {cuts[0]}" if cuts else "all", *cuts, "missing"][: feature.binning.size]


def render_html(fleet: FleetModel, bucket_s: float = 3600.0) -> str:
    pack = fleet.pack
    total = fleet.total
    order = sorted(total.counts, key=lambda i: -total.divergence.get(pack.features[i].name, 0.0))
    cards = []
    for index in order:
        feature = pack.features[index]
        counts = total.counts[index].counts
        current = (counts / max(1, counts.sum())).tolist()
        labels = _bin_labels(pack, index)
        cards.append(
            f'<div class="card"><h3>{html.escape(feature.name)}</h3>'
            f'<div class="muted">JS {total.divergence.get(feature.name, 0.0):.4f} bits · '
            f"{int(counts.sum())} rows · {feature.kind}</div>"
            f"{_histogram(list(feature.reference), current, [labels[0], labels[-1]])}</div>"
        )
    changes = "".join(
        f"<tr><td>{_time(t)}</td><td>{html.escape(device)}</td><td>{version}</td>"
        f'<td class="{html.escape(old)}">{html.escape(old)}</td>'
        f'<td class="{html.escape(new)}">{html.escape(new)}</td></tr>'
        for t, device, version, old, new in fleet.changes
    )
    title = f"Drift of {fleet.model}"
    versions = ", ".join(map(str, sorted(fleet.versions)))
    found = verdict(fleet)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
{_verdict_html(fleet, found)}
<p class="muted">baseline {fleet.baseline[:12]} · versions {versions}
 · {total.profiles} windows · {total.rows} rows · {len(total.devices)} devices ·
 <span style="color:{_REFERENCE}">■</span> training reference
 <span style="color:{_CURRENT}">■</span> merged current</p>
<h2>Score over time</h2>{_timeline(fleet, bucket_s)}
<h2>Features, most divergent first</h2><div class="grid">{"".join(cards)}</div>
<h2>State changes</h2>
<table><tr><th>time (UTC)</th><th>device</th><th>version</th><th>from</th><th>to</th></tr>
{changes or '<tr><td colspan="5" class="muted">none</td></tr>'}</table>
</body></html>
"""


def page_name(model: FleetModel) -> str:
    """`<model>-v<versions>-<baseline>.html`: the name says which model and releases it shows."""
    versions = "-".join(f"v{v}" for v in sorted(model.versions))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.model)
    return f"{safe}-{versions}-{model.baseline[:12]}.html"


def _index_html(fleet: Sequence[FleetModel], names: Sequence[str]) -> str:
    rows = []
    for model, name in zip(fleet, names, strict=True):
        found = verdict(model)
        css = "drift" if found.drifting else "warning" if found.warning else "ok"
        rows.append(
            f'<tr><td><a href="{html.escape(name)}">{html.escape(model.model)}</a></td>'
            f"<td>{', '.join(map(str, sorted(model.versions)))}</td>"
            f'<td class="{css}">{html.escape(found.headline)}</td>'
            f"<td>{html.escape(', '.join(found.features)) or '-'}</td>"
            f"<td>{len(model.total.devices)}</td><td>{model.total.rows}</td></tr>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Fleet drift</title>
<style>{_CSS}</style></head><body>
<h1>Fleet drift</h1>
<table><tr><th>model</th><th>versions</th><th>verdict</th><th>driven by</th><th>devices</th>
<th>rows</th></tr>
{"".join(rows) or '<tr><td colspan="6" class="muted">no drift profile</td></tr>'}</table>
</body></html>
"""


def write_reports(fleet: Sequence[FleetModel], out: Path, bucket_s: float = 3600.0) -> list[Path]:
    """One page per model and baseline, and `index.html` linking them; the pages first."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    names = [page_name(model) for model in fleet]
    for model, name in zip(fleet, names, strict=True):
        path = out / name
        path.write_text(render_html(model, bucket_s), encoding="utf-8")
        written.append(path)
    index = out / "index.html"
    index.write_text(_index_html(fleet, names), encoding="utf-8")
    return [*written, index]

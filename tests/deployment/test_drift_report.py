"""Fleet merge of drift profiles and the HTML report, rendered in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from azure.storage.blob import BlobServiceClient
from PIL import Image

from agent.observation.drift import DriftMonitor, DriftSettings, profile_message
from deployment.cli import run
from deployment.drift.report import (
    _tick_format,
    load_baselines,
    merge_profiles,
    page_name,
    read_blob_profiles,
    read_profiles,
    render_html,
    verdict,
)
from deployment.errors import PublisherError
from simulator.azurite import Azurite
from tests.support.clock import FakeClock
from tests.support.drift_packs import tabular_pack, tabular_rows

START = 1_760_000_000.0


def _cli(argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m deployment ARGV` in-process: its exit code and what it wrote to stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = run(argv, environ=environ or {}, stdout=out, stderr=err, logs=False)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def fleet_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """Two devices, 12 windows of 50 rows each; the second half of each is shifted."""
    root = tmp_path_factory.mktemp("fleet")
    pack = tabular_pack()
    data = json.dumps(pack.model_dump(mode="json", by_alias=True)).encode()
    baseline = root / "baseline.json"
    baseline.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    routed = root / "routed"
    routed.mkdir()
    rows = 0
    for device in ("cam-1", "cam-2"):
        clock = FakeClock()
        monitor = DriftMonitor(
            pack, DriftSettings(window_rows=50, max_rows_per_request=50), clock=clock
        )
        rng = np.random.default_rng(len(device) + ord(device[-1]))
        lines = []
        for window in range(12):
            inputs, outputs = tabular_rows(rng, 50, shift=2.0 if window >= 6 else 0.0)
            monitor.observe(inputs, outputs, 50)
            clock.now += 600
            (result,) = monitor.close_windows()
            rows += result.score.rows
            body = profile_message(
                result,
                model="anomaly",
                version=7,
                baseline_sha256=sha,
                features=monitor.features,
                max_features=32,
                wall_clock=START + clock.now,
            )
            # As IoT Hub routing stores messages: the JSON itself, or base64 when the message
            # did not say application/json.
            stored: object = body
            if window % 2:
                stored = base64.b64encode(json.dumps(body).encode()).decode()
            envelope = {"SystemProperties": {"connectionDeviceId": device}, "Body": stored}
            lines.append(json.dumps(envelope))
        lines.append(json.dumps({"Body": {"schema": "agent-latency/1"}}))  # other telemetry
        (routed / f"{device}.json").write_text("\n".join(lines))
    return routed, baseline, rows


def test_merged_profiles_add_up_and_later_buckets_score_higher(
    fleet_files: tuple[Path, Path, int],
) -> None:
    routed, baseline, rows = fleet_files
    profiles = read_profiles([routed])
    assert len(profiles) == 24
    (fleet,) = merge_profiles(profiles, load_baselines([baseline]), bucket_s=3600.0)
    assert fleet.total.rows == rows == 1200
    assert fleet.total.devices == {"cam-1", "cam-2"}
    assert int(fleet.total.counts[0].counts.sum()) == 1200
    assert sum(b.rows for b in fleet.buckets) == 1200
    early, late = fleet.buckets[0], fleet.buckets[-1]
    assert late.score > early.score + 3
    assert late.divergence["x[0]"] > early.divergence["x[0]"]
    drifted = {(device, new) for _, device, _, _, new in fleet.changes}
    assert {("cam-1", "drift"), ("cam-2", "drift")} <= drifted


def test_the_verdict_names_the_drifting_devices_since_when_and_the_features_behind_it(
    fleet_files: tuple[Path, Path, int],
) -> None:
    routed, baseline, _ = fleet_files
    (fleet,) = merge_profiles(read_profiles([routed]), load_baselines([baseline]), 3600.0)
    found = verdict(fleet)
    assert found.headline == "In drift on 2 device(s)"
    assert set(found.drifting) == {"cam-1", "cam-2"}
    # Each device drifted in the shifted second half of its windows (from window 6 on).
    assert all(since >= START + 6 * 600 for since in found.drifting.values())
    assert found.features[0] == "x[0]"  # tabular_rows shifts the first feature most
    page = render_html(fleet)
    assert page.index("In drift on 2 device(s)") < page.index("Score over time")


@pytest.mark.parametrize(
    ("span_s", "bucket_s", "labels_differ_at"),
    [
        (3 * 3600, 1800, "%H:%M"),
        (120, 10, "%H:%M:%S"),
        (5 * 86_400, 3600, "%m-%d %H:%M"),
    ],
)
def test_time_labels_tell_neighbouring_buckets_apart(
    span_s: float, bucket_s: float, labels_differ_at: str
) -> None:
    fmt = _tick_format(span_s, bucket_s)
    assert fmt == labels_differ_at
    first, second = (
        datetime.fromtimestamp(START + i * bucket_s, UTC).strftime(fmt) for i in (0, 1)
    )
    assert first != second


def test_a_page_name_carries_the_model_and_its_versions(
    fleet_files: tuple[Path, Path, int],
) -> None:
    routed, baseline, _ = fleet_files
    (fleet,) = merge_profiles(read_profiles([routed]), load_baselines([baseline]), 3600.0)
    fleet.versions.add(8)
    fleet.model = "a/b model"
    assert page_name(fleet) == f"a_b_model-v7-v8-{fleet.baseline[:12]}.html"


def test_profiles_of_an_unknown_baseline_are_refused(fleet_files: tuple[Path, Path, int]) -> None:
    routed, _, _ = fleet_files
    with pytest.raises(ValueError, match="no baseline given"):
        merge_profiles(read_profiles([routed]), {}, bucket_s=3600.0)


def test_a_malformed_profile_names_its_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "agent-drift-profile/1", "model": "m"}))
    with pytest.raises(PublisherError, match=r"bad\.json: malformed drift profile"):
        read_profiles([bad])


def _screenshot(page: Path, out: Path, profile_dir: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "make system-deps installs Debian's chromium"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile_dir}",
            "--hide-scrollbars",
            "--window-size=1200,1400",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )


@pytest.mark.e2e
def test_the_report_renders_in_chromium_with_charts(
    fleet_files: tuple[Path, Path, int], tmp_path: Path
) -> None:
    routed, baseline, _ = fleet_files
    out = tmp_path / "report"
    argv = ["drift-report", "--profiles", str(routed), "--baseline", str(baseline), "-o", str(out)]
    assert _cli([*argv, "--bucket-seconds", "1800"])[0] == 0
    (page,) = (p for p in out.glob("*.html") if p.name != "index.html")
    assert page.name.startswith("anomaly-v7-")
    text = page.read_text()
    assert "Drift of anomaly" in text
    assert "alarm threshold" in text
    assert "evidence (sd)" in text
    index = (out / "index.html").read_text()
    assert f'href="{page.name}"' in index
    png = tmp_path / "report.png"
    _screenshot(page, png, tmp_path / "chromium-profile")
    image = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    assert image.shape[:2] == (1400, 1200)
    not_white = (image.min(axis=2) < 235).mean()
    current = (np.abs(image - [0xE4, 0x57, 0x2E]).sum(axis=2) < 40).sum()  # the orange series
    reference = (np.abs(image - [0x8A, 0xA4, 0xC8]).sum(axis=2) < 40).sum()
    assert not_white > 0.03, f"only {not_white:.1%} of the page is drawn"
    assert current > 500
    assert reference > 500


@pytest.mark.e2e
def test_the_report_reads_profiles_from_blob_storage_as_routing_leaves_them(
    fleet_files: tuple[Path, Path, int],
    tmp_path: Path,
) -> None:
    routed, baseline, rows = fleet_files
    with Azurite.start(tmp_path / "azurite") as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        container = service.create_container("telemetry")
        for i, file in enumerate(sorted(routed.iterdir())):
            container.upload_blob(f"hub/0/2026/11/30/10/{i:02d}", file.read_bytes())
        container.upload_blob("elsewhere/x", b'{"not": "a profile"}')
        profiles = read_blob_profiles(container, prefix="hub/")
        assert len(profiles) == 24
        (fleet,) = merge_profiles(profiles, load_baselines([baseline]), bucket_s=3600.0)
        assert fleet.total.rows == rows
        environ = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
        out = tmp_path / "report"
        argv = ["drift-report", "--container", "telemetry", "--prefix", "hub/"]
        assert _cli([*argv, "--baseline", str(baseline), "-o", str(out)], environ)[0] == 0
        page, index = sorted(p.name for p in out.glob("*.html"))
        assert page.startswith("anomaly-v7-")
        assert index == "index.html"
        service.close()


def test_the_command_needs_somewhere_to_read(tmp_path: Path) -> None:
    argv = ["drift-report", "--baseline", str(tmp_path / "b.json"), "-o", str(tmp_path)]
    code, err = _cli(argv)
    assert code == 2
    assert "--profiles, --container" in err


@pytest.mark.e2e
def test_a_missing_container_is_one_line_naming_it(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(tabular_pack().model_dump(mode="json", by_alias=True)))
    with Azurite.start(tmp_path / "azurite") as azurite:
        environ = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
        argv = ["drift-report", "--container", "nowhere", "--baseline", str(baseline)]
        code, err = _cli([*argv, "-o", str(tmp_path / "out")], environ)
    assert code == 1
    assert err.strip().splitlines() == [
        "edgeml: error [not_found]: Blob container 'nowhere' does not exist in that storage account"
    ]

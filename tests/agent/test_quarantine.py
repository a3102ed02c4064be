"""The quarantine child: pure verdicts and budgets from tables, then real children running
real bomb models under the limits the test sets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import ReleaseManifest, sign_manifest, verify_manifest
from agent.releases.quarantine import (
    DEFAULT_MEMORY_BYTES,
    MIN_MEMORY_BYTES,
    Passed,
    Quarantine,
    QuarantineSettings,
    Refused,
    classify_exit,
    memory_budget,
)
from agent.serving.engine import RuntimeOptions
from deployment.publish.release import build_manifest
from tests.support import bombs
from tests.support.artifact_server import Artifact, TestPki
from tests.support.models import mid_bytes, tiny_bytes
from tests.support.releases import KEY_ID, Device, Publisher, make_device
from wire.reasons import Reason

MIB = 1 << 20
GIB = 1 << 30


@pytest.mark.parametrize(
    ("memory_free", "configured", "expected"),
    [
        (None, None, DEFAULT_MEMORY_BYTES),
        (None, 300 * MIB, 300 * MIB),
        (2 * GIB, 300 * MIB, 300 * MIB),  # the setting wins
        (1536 * MIB, None, 768 * MIB),  # half of what is free
        (0, None, MIN_MEMORY_BYTES),  # never below
        (None, 1, MIN_MEMORY_BYTES),
    ],
)
def test_memory_budget(memory_free: int | None, configured: int | None, expected: int) -> None:
    assert memory_budget(memory_free, configured) == expected


_PASSED = b'{"passed":true,"cost":{"fixed_s":0.001,"per_row_s":0.0001}}\n'


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "timed_out", "reason"),
    [
        (0, _PASSED, b"", False, None),
        (0, b'noise\n{"passed":false,"reason":"golden_mismatch","message":"m"}\n', b"", False,
         Reason.GOLDEN_MISMATCH),
        (0, b'{"passed":false,"reason":"made_up","message":"m"}', b"", False, Reason.LOAD_FAILED),
        (0, b"", b"", False, Reason.LOAD_FAILED),  # no report at all
        (0, b"{not json", b"", False, Reason.LOAD_FAILED),
        (None, b"", b"", True, Reason.LOAD_TIMEOUT),  # killed by the wall-clock deadline
        (-signal.SIGXCPU, b"", b"", False, Reason.LOAD_TIMEOUT),  # RLIMIT_CPU, soft
        (-signal.SIGKILL, b"", b"", False, Reason.RESOURCE_LIMIT),  # OOM killer or CPU hard
        (-signal.SIGABRT, b"", b"terminate called ... std::bad_alloc", False,
         Reason.RESOURCE_LIMIT),
        (-signal.SIGSEGV, b"", b"", False, Reason.LOAD_FAILED),
        (1, b"", b"Traceback", False, Reason.LOAD_FAILED),
    ],
)  # fmt: skip
def test_classify_exit(
    returncode: int | None, stdout: bytes, stderr: bytes, timed_out: bool, reason: Reason | None
) -> None:
    result = classify_exit(returncode, stdout, stderr, timed_out=timed_out, seconds=1.0)
    if reason is None:
        assert isinstance(result, Passed)
        assert result.cost.fixed_s == pytest.approx(0.001)
    else:
        assert isinstance(result, Refused)
        assert result.reason is reason
        assert result.message


# --- real children -------------------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()


def _manifest(model: bytes, *, golden: bool = True) -> ReleaseManifest:
    raw = build_manifest(
        model,
        name="m",
        version=1,
        url="https://models.example/m.onnx",
        key=KEY,
        key_id="k",
        golden_atol=1e-4 if golden else None,  # a bomb cannot be run to make its golden sample
    )
    return verify_manifest(raw, {"k": KEY.public_key()}, datetime.now(UTC))


async def _check(
    tmp_path: Path, model: bytes, settings: QuarantineSettings, *, golden: bool = True
) -> tuple[Passed | Refused, float]:
    path = tmp_path / "candidate.onnx"
    path.write_bytes(model)
    quarantine = Quarantine(settings, memory_free=lambda: None)
    started = time.monotonic()
    try:
        result = await quarantine.check(path, _manifest(model, golden=golden), RuntimeOptions(), 8)
    finally:
        await quarantine.close()
    return result, time.monotonic() - started


# Far below the machine's memory, far above what a real small model needs.
LIMITED = QuarantineSettings(memory_bytes=512 * MIB, cpu_s=8, wall_s=60.0, spare=False)
# For sound models: the same memory, CPU and time a loaded machine may need.
SOUND = QuarantineSettings(memory_bytes=512 * MIB, cpu_s=60, wall_s=120.0, spare=False)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("bomb", "reason"),
    [
        ("constant_of_shape", Reason.RESOURCE_LIMIT),
        ("expand", Reason.RESOURCE_LIMIT),
        ("tile", Reason.RESOURCE_LIMIT),
        ("loop_allocating", Reason.RESOURCE_LIMIT),
        ("loop_forever", Reason.LOAD_TIMEOUT),
    ],
)
async def test_a_bomb_fails_in_its_child_with_a_bounded_reason(
    tmp_path: Path, bomb: str, reason: Reason
) -> None:
    result, seconds = await _check(tmp_path, bombs.BOMBS[bomb](), LIMITED, golden=False)
    assert isinstance(result, Refused), result
    assert result.reason is reason, result.message
    assert seconds < 60


@pytest.mark.e2e
async def test_the_wall_clock_deadline_kills_a_child_that_sleeps_through_its_cpu_limit(
    tmp_path: Path,
) -> None:
    # A CPU limit it cannot reach in time: the wall-clock deadline is what stops it.
    settings = QuarantineSettings(memory_bytes=512 * MIB, cpu_s=3600, wall_s=4.0, spare=False)
    result, seconds = await _check(tmp_path, bombs.loop_forever(), settings, golden=False)
    assert isinstance(result, Refused)
    assert result.reason is Reason.LOAD_TIMEOUT
    assert "wall-clock" in result.message
    assert seconds < 30


@pytest.mark.e2e
async def test_a_sound_model_passes_with_its_measured_cost(tmp_path: Path) -> None:
    result, _ = await _check(tmp_path, mid_bytes(0), SOUND)
    assert isinstance(result, Passed), result
    assert 0 < result.cost.fixed_s < 1.0


@pytest.mark.e2e
async def test_a_golden_sample_that_does_not_match_fails_in_the_child(tmp_path: Path) -> None:
    manifest = _manifest(tiny_bytes(0))
    path = tmp_path / "other.onnx"
    path.write_bytes(tiny_bytes(1))  # same contract, other weights: the golden output differs
    quarantine = Quarantine(SOUND, memory_free=lambda: None)
    result = await quarantine.check(path, manifest, RuntimeOptions(), 8)
    assert isinstance(result, Refused)
    assert result.reason is Reason.GOLDEN_MISMATCH


@pytest.mark.e2e
async def test_a_spare_child_takes_the_next_check_and_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_bytes(0))
    quarantine = Quarantine(SOUND.model_copy(update={"spare": True}), memory_free=lambda: None)
    quarantine.prepare()
    try:
        for _ in range(2):
            result = await quarantine.check(path, _manifest(tiny_bytes(0)), RuntimeOptions(), 8)
            assert isinstance(result, Passed), result
        assert quarantine._spare is not None  # the next one is on its way
    finally:
        await quarantine.close()
    assert quarantine._spare is None


@pytest.mark.e2e
async def test_a_cancelled_check_leaves_no_child_behind(tmp_path: Path) -> None:
    path = tmp_path / "forever.onnx"
    path.write_bytes(bombs.loop_forever())
    quarantine = Quarantine(LIMITED, memory_free=lambda: None)
    check = asyncio.create_task(
        quarantine.check(path, _manifest(bombs.loop_forever(), golden=False), RuntimeOptions(), 8)
    )
    await asyncio.sleep(1.0)
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    await quarantine.close()
    assert not _our_quarantine_children()


def _our_quarantine_children() -> list[Path]:
    return [p for p in Path("/proc").glob("[0-9]*") if _is_quarantine_child_of_us(p)]


def _is_quarantine_child_of_us(proc: Path) -> bool:
    try:
        status = (proc / "status").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
    state = next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))
    return ppid == os.getpid() and b"agent.releases.quarantine" in cmdline and state != "Z"


# --- through the install pipeline ----------------------------------------------------------


@pytest.fixture
async def guarded(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> AsyncIterator[Device]:
    quarantine = Quarantine(SOUND.model_copy(update={"cpu_s": 8}), memory_free=lambda: None)
    device = make_device(tmp_path / "store", publisher, artifact_pki, quarantine=quarantine)
    yield device
    await device.manager.close()


async def _install(device: Device, manifest: dict[str, object]) -> tuple[str, str | None]:
    device.manager.submit(manifest)
    await device.manager.wait_idle()
    status = device.manager.statuses["m"]
    return status.state.value, status.reason.value if status.reason else None


@pytest.mark.e2e
async def test_the_pipeline_quarantines_then_loads_and_a_refusal_keeps_the_active_model(
    guarded: Device, publisher: Publisher
) -> None:
    assert await _install(guarded, publisher.release(tiny_bytes(0), 1)) == ("active", None)
    # A manifest like v1's for other bytes: the file check runs before any child.
    garbage = b"\x00not an onnx file" * 64
    unsigned = {k: v for k, v in publisher.release(tiny_bytes(0), 2).items() if k != "golden"}
    unsigned |= {
        "sha256": hashlib.sha256(garbage).hexdigest(),
        "size": len(garbage),
        "url": publisher.server.add("m/garbage.onnx", Artifact(garbage)),
    }
    del unsigned["signature"]
    bad = sign_manifest(unsigned, publisher.key, KEY_ID)
    assert await _install(guarded, bad) == ("failed", "not_onnx")
    bomb = publisher.release(bombs.expand(), 3, golden_atol=None, contract_change=True)
    assert await _install(guarded, bomb) == ("failed", "resource_limit")
    assert guarded.store.state.record("m").rolled_back is not None
    assert guarded.failures("resource_limit") == 1
    # Offered again (a twin resync): refused at once, no child.
    assert await _install(guarded, bomb) == ("failed", "resource_limit")
    assert guarded.store.state.record("m").active.version == 1  # type: ignore[union-attr]

"""Model store: pure state transitions, garbage selection, atomic state, orphans, full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.releases.state import (
    ModelRecord,
    ModelRef,
    NoLastKnownGoodError,
    RolledBack,
    StoreState,
    select_garbage,
)
from agent.releases.store import ModelStore, StoreError, WritableFile
from tests.support.artifact_server import FullDisk
from wire.reasons import Reason

A, B, C, D, E = (c * 64 for c in "abcde")
V1, V2, V3 = ModelRef(1, A), ModelRef(2, B, baseline_sha256=E), ModelRef(3, C)
ROLLBACK = (Reason.REQUESTED, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


# --- pure transitions ----------------------------------------------------------------------


def test_activation_makes_the_previous_model_last_known_good() -> None:
    state = StoreState().activated("m", V1).activated("m", V2)
    assert state.record("m") == ModelRecord(active=V2, last_known_good=V1, highest_seen=V2)


def test_reactivating_the_active_release_keeps_the_last_known_good() -> None:
    state = StoreState().activated("m", V1).activated("m", V2).activated("m", V2)
    assert state.record("m").last_known_good == V1


def test_rollback_serves_last_known_good_keeps_it_known_good_and_keeps_highest_seen() -> None:
    state = StoreState().activated("m", V1).activated("m", V2).rolled_back("m", *ROLLBACK)
    assert state.record("m") == ModelRecord(
        active=V1,
        last_known_good=V1,
        highest_seen=V2,
        rolled_back=RolledBack(V2.version, V2.sha256, *ROLLBACK),
    )
    assert state.record("m").fallback is None  # nothing older to roll back to


def test_after_a_rollback_the_next_release_falls_back_to_the_release_rolled_back_to() -> None:
    state = StoreState().activated("m", V1).activated("m", V2).rolled_back("m", *ROLLBACK)
    state = state.activated("m", V3)
    assert (state.record("m").last_known_good, state.record("m").fallback) == (V1, V1)


@pytest.mark.parametrize(
    ("record", "fallback"),
    [
        (ModelRecord(), None),
        (ModelRecord(active=V1), None),
        (ModelRecord(active=V2, last_known_good=V1), V1),
        (ModelRecord(active=V1, last_known_good=V1), None),  # after a rollback
        (ModelRecord(last_known_good=V1), V1),
    ],
)
def test_fallback_is_the_last_known_good_unless_it_serves(
    record: ModelRecord, fallback: ModelRef | None
) -> None:
    assert record.fallback == fallback


@pytest.mark.parametrize(
    ("then_seen", "still_refused"),
    [(None, True), (V1, True), (V2, True), (V3, False)],
)
def test_a_rolled_back_release_stays_recorded_until_a_higher_version_is_seen(
    then_seen: ModelRef | None, still_refused: bool
) -> None:
    state = StoreState().activated("m", V1).activated("m", V2).rolled_back("m", *ROLLBACK)
    if then_seen is not None:
        state = state.seen("m", then_seen)
    state = StoreState.from_json_bytes(json.dumps(state.to_json()).encode())  # a restart
    rolled = state.record("m").rolled_back
    assert (rolled is not None and rolled.is_release(V2.version, V2.sha256)) is still_refused


def test_rollback_without_last_known_good_is_refused() -> None:
    with pytest.raises(NoLastKnownGoodError):
        StoreState().activated("m", V1).rolled_back("m", *ROLLBACK)


def test_a_second_rollback_is_refused_rather_than_rolling_back_to_itself() -> None:
    state = StoreState().activated("m", V1).activated("m", V2).rolled_back("m", *ROLLBACK)
    with pytest.raises(NoLastKnownGoodError):
        state.rolled_back("m", *ROLLBACK)


@pytest.mark.parametrize(
    ("already", "seen", "expected"),
    [(None, V2, V2), (V1, V2, V2), (V2, V1, V2), (V2, V2, V2), (V3, V2, V3)],
)
def test_highest_seen_never_goes_back(
    already: ModelRef | None, seen: ModelRef, expected: ModelRef
) -> None:
    state = StoreState() if already is None else StoreState().seen("m", already)
    assert state.seen("m", seen).record("m").highest_seen == expected


def test_a_removed_model_keeps_what_was_seen_and_refused_but_protects_no_file() -> None:
    state = (
        StoreState()
        .activated("m", V1)
        .activated("m", V2)
        .rolled_back("m", *ROLLBACK)
        .activated("n", V3)
        .installing("m", V3)
        .removed("m")
    )
    assert state.record("m") == ModelRecord(
        highest_seen=V2, rolled_back=RolledBack(V2.version, V2.sha256, *ROLLBACK)
    )
    assert state.protected_artifacts() == {C}  # only the other model's
    assert StoreState().removed("never").record("never") == ModelRecord()


def test_transitions_do_not_change_the_original() -> None:
    before = StoreState().activated("m", V1)
    before.activated("m", V2)
    assert before.record("m").active == V1
    with pytest.raises(TypeError):
        before.models["x"] = ModelRecord()  # type: ignore[index]  # the point: it is read-only


def test_models_are_independent() -> None:
    state = StoreState().activated("a", V1).activated("b", V2)
    assert state.record("a").active == V1
    assert state.record("b").active == V2
    assert state.protected_artifacts() == {A, B}
    assert state.protected_baselines() == {E}


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "../" + "a" * 61, ""])
def test_model_ref_refuses_what_is_not_a_digest(bad: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        ModelRef(1, bad)


def test_state_json_round_trip() -> None:
    state = StoreState().activated("m", V1).activated("m", V2).seen("m", V3).activated("n", V1)
    data = json.dumps(state.to_json()).encode()
    assert StoreState.from_json_bytes(data) == state


@pytest.mark.parametrize(
    ("mtimes", "protected", "keep", "expected"),
    [
        ({}, frozenset(), 3, set()),
        ({A: 1, B: 2, C: 3}, frozenset(), 3, set()),
        ({A: 1, B: 2, C: 3, D: 4}, frozenset(), 3, {A}),
        ({A: 1, B: 2, C: 3, D: 4}, frozenset({A}), 3, set()),
        ({A: 1, B: 2, C: 3, D: 4, E: 5}, frozenset({A, B}), 1, {C, D}),
        ({A: 1, B: 2, C: 3}, frozenset({C}), 0, {A, B}),
        ({A: 5, B: 5, C: 5}, frozenset(), 1, {A, B}),  # ties broken by digest: deterministic
    ],
)
def test_select_garbage(
    mtimes: dict[str, float], protected: frozenset[str], keep: int, expected: set[str]
) -> None:
    assert select_garbage(mtimes, protected, keep) == expected


# --- on disk -------------------------------------------------------------------------------


def opened_store(root: Path, **kwargs: Any) -> ModelStore:
    store = ModelStore(root, **kwargs)
    store.open()
    return store


def put_artifact(store: ModelStore, sha: str, body: bytes = b"onnx", mtime: float = 0) -> Path:
    part = store.artifact_part(sha)
    f = part.open(append=False)
    f.write(body)
    f.close()
    path = store.commit_artifact(sha)
    if mtime:
        os.utime(path, (mtime, mtime))
    return path


def test_open_creates_the_layout_and_starts_empty(tmp_path: Path) -> None:
    store = opened_store(tmp_path / "vol")
    assert store.state == StoreState()
    assert (tmp_path / "vol" / "models").is_dir()
    assert (tmp_path / "vol" / "baselines").is_dir()


def test_open_on_an_unusable_state_directory_names_it(tmp_path: Path) -> None:
    """A file where the store's directory should be (the tests run as root, which writes
    anywhere: the container's non-root uid meeting a root-owned volume is tests/container's)."""
    (tmp_path / "vol").write_text("not a directory")
    with pytest.raises(StoreError, match=r"state directory .*vol is not usable by uid \d+"):
        ModelStore(tmp_path / "vol").open()


def test_saved_state_survives_a_restart(tmp_path: Path) -> None:
    state = StoreState().activated("m", V1).activated("m", V2)
    opened_store(tmp_path).save(state)
    assert opened_store(tmp_path).state == state
    assert not list(tmp_path.glob("*.tmp"))


def test_state_write_is_atomic_under_a_full_disk(tmp_path: Path) -> None:
    """A full disk while writing state: old state.json intact, temp removed, reason disk_full."""
    opened_store(tmp_path).save(StoreState().activated("m", V1))
    before = (tmp_path / "state.json").read_bytes()
    store = opened_store(tmp_path, opener=FullDisk(budget=10))
    with pytest.raises(StoreError) as info:
        store.save(StoreState().activated("m", V1).activated("m", V2))
    assert info.value.reason is Reason.DISK_FULL
    assert (tmp_path / "state.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baselines", "models", "state.json"]
    assert store.state.record("m").active == V1


def test_orphan_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    store = opened_store(tmp_path)
    kept = put_artifact(store, A)
    orphans = [
        tmp_path / "models" / f"{B}.part",
        tmp_path / "baselines" / f"{C}.part",
        tmp_path / "state.json.tmp",
        tmp_path / "models" / "x.tmp",
    ]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    not_ours = tmp_path / "spool.tmp"
    not_ours.write_bytes(b"another service's file")
    with capture_logs() as logs:
        opened_store(tmp_path)
    assert not any(p.exists() for p in orphans)
    assert kept.exists()
    assert not_ours.exists()
    assert sum(entry["event"] == "store_orphan_removed" for entry in logs) == 4


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[]", b'{"schema": 2, "models": {}}', b'{"schema": 1, "models": 3}'],
)
def test_corrupt_state_is_kept_aside_and_the_store_starts_empty(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with capture_logs() as logs:
        store = opened_store(tmp_path)
    assert store.state == StoreState()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert [p.read_bytes() for p in aside] == [content]
    assert not (tmp_path / "state.json").exists()
    assert [entry["log_level"] for entry in logs if entry["event"] == "store_state_corrupt"] == [
        "error"
    ]


def test_commit_gives_the_part_its_content_addressed_name(tmp_path: Path) -> None:
    store = opened_store(tmp_path)
    path = put_artifact(store, A, b"model bytes")
    assert path == tmp_path / "models" / f"{A}.onnx"
    assert path.read_bytes() == b"model bytes"
    assert not store.artifact_part(A).path.exists()
    assert store.has_artifact(A)


def test_verify_artifact_rehashes_the_file(tmp_path: Path) -> None:
    store = opened_store(tmp_path)
    body = b"model bytes"
    sha = hashlib.sha256(body).hexdigest()
    put_artifact(store, sha, body)
    assert store.verify_artifact(sha)
    store.artifact_path(sha).write_bytes(b"model bytez")
    assert not store.verify_artifact(sha)


def test_baselines_are_content_addressed_too(tmp_path: Path) -> None:
    store = opened_store(tmp_path)
    part = store.baseline_part(E)
    f = part.open(append=False)
    f.write(b"{}")
    f.close()
    assert store.commit_baseline(E) == tmp_path / "baselines" / f"{E}.json"


def test_gc_keeps_active_last_known_good_and_the_newest_others(tmp_path: Path) -> None:
    store = opened_store(tmp_path, keep_old_artifacts=1)
    for mtime, sha in enumerate([A, B, C, D, E], start=1_000):
        put_artifact(store, sha, mtime=mtime)
    # A (oldest) is last-known-good and B active: both kept though they are old.
    store.save(StoreState().activated("m", ModelRef(1, A)).activated("m", ModelRef(2, B)))
    removed = store.collect_garbage()
    assert removed == (f"{C}.onnx", f"{D}.onnx")
    assert sorted(p.stem for p in (tmp_path / "models").iterdir()) == [A, B, E]


def test_gc_collects_unreferenced_baselines(tmp_path: Path) -> None:
    store = opened_store(tmp_path, keep_old_artifacts=0)
    for sha in (C, E):
        (tmp_path / "baselines" / f"{sha}.json").write_bytes(b"{}")
    store.save(StoreState().activated("m", V2))  # V2 references baseline E
    put_artifact(store, B)
    assert store.collect_garbage() == (f"{C}.json",)


def test_free_space_check_keeps_a_margin(tmp_path: Path) -> None:
    store = opened_store(
        tmp_path, free_space_margin_bytes=100, disk_usage=lambda _path: (10_000, 9_000, 1_000)
    )
    store.ensure_free_space(900)
    with pytest.raises(StoreError) as info:
        store.ensure_free_space(901)
    assert info.value.reason is Reason.DISK_FULL


def test_part_file_appends_for_resume(tmp_path: Path) -> None:
    store = opened_store(tmp_path)
    part = store.artifact_part(A)
    for chunk, append in ((b"abc", False), (b"def", True)):
        f = part.open(append=append)
        f.write(chunk)
        f.close()
    assert part.size() == 6
    f = part.open(append=False)
    f.close()
    assert part.size() == 0
    part.remove()
    assert part.size() == 0


def test_other_write_errors_are_io_error_and_keep_the_old_state(tmp_path: Path) -> None:
    def broken_disk(path: Path, mode: str) -> WritableFile:
        raise OSError(errno.EIO, "Input/output error")

    opened_store(tmp_path).save(StoreState().activated("m", V1))
    store = opened_store(tmp_path, opener=broken_disk)
    with pytest.raises(StoreError) as info:
        store.save(StoreState().activated("m", V2))
    assert info.value.reason is Reason.IO_ERROR
    assert opened_store(tmp_path).state.record("m").active == V1

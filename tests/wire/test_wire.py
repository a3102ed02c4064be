"""The wire package's own promises: one reason vocabulary, one contract form, profile.json."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from agent.profiler import read_profile
from deployment.errors import PublisherError
from deployment.publish.release import ModelCheckError
from wire.contract import ModelContract, TensorSpec
from wire.manifest import Contract, UnsignedManifest
from wire.profile import SCHEMA, Profile, ProfileDocument
from wire.reasons import AgentError, Reason, ReasonedError


def test_no_reason_is_an_alias_of_another() -> None:
    # An enum silently aliases a repeated value: a cloud value equal to a device one would
    # vanish into it instead of failing.
    assert len(Reason.__members__) == len(list(Reason))


@pytest.mark.parametrize(
    ("value", "present"),
    [
        ("golden_mismatch", True),
        ("version_not_monotonic", True),
        ("schema_invalid", True),
        ("version_not_newer", False),  # the cloud's former spellings of those meanings
        ("manifest_invalid", False),
    ],
)
def test_the_device_spelling_is_the_one_value_for_a_shared_meaning(
    value: str, present: bool
) -> None:
    assert (value in {r.value for r in Reason}) is present


@pytest.mark.parametrize("error", [AgentError, PublisherError, ModelCheckError])
def test_device_and_cloud_errors_share_one_base_with_a_reason(
    error: type[ReasonedError],
) -> None:
    raised = error(Reason.GOLDEN_MISMATCH, "output 'y' differs")
    assert isinstance(raised, ReasonedError)
    assert raised.reason is Reason.GOLDEN_MISMATCH
    assert str(raised) == "golden_mismatch: output 'y' differs"


MANIFEST_CONTRACT = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
}


def test_a_manifest_contract_is_the_serving_contract_without_conversion() -> None:
    parsed = Contract.model_validate_json(json.dumps(MANIFEST_CONTRACT))
    assert isinstance(parsed, ModelContract)
    served = ModelContract(
        inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),),
        outputs=(TensorSpec(name="y", datatype="INT64", shape=(-1,)),),
    )
    assert parsed.differences(served) == []
    assert parsed.batchable
    assert parsed.model_dump(mode="json") == MANIFEST_CONTRACT


@pytest.mark.parametrize(
    ("contract", "message"),
    [
        ({**MANIFEST_CONTRACT, "outputs": []}, "outputs"),
        ({**MANIFEST_CONTRACT, "inputs": MANIFEST_CONTRACT["inputs"] * 2}, "duplicate"),
        ({**MANIFEST_CONTRACT, "extra": 1}, "extra"),
    ],
)
def test_a_manifest_contract_keeps_its_own_bounds(contract: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Contract.model_validate_json(json.dumps(contract))


UNSIGNED = {
    "name": "m",
    "version": 3,
    "sha256": "a" * 64,
    "size": 10,
    "url": "https://models.example/m.onnx",
    "created": "2026-12-08T00:00:00+00:00",
    "contract": MANIFEST_CONTRACT,
}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"expires": "2026-12-09T00:00:00+00:00", "contract_change": True},
        {"schema": 2, "baseline": {"sha256": "b" * 64, "size": 5, "url": "https://b/p.json"}},
    ],
)
def test_an_unsigned_manifest_is_written_back_exactly_as_it_was_given(
    extra: dict[str, Any],
) -> None:
    # Exactly: no null for an absent field (a twin patch would delete it and break the
    # signature), no default spelt out, timestamps as written.
    given = UNSIGNED | extra
    assert UnsignedManifest.model_validate_json(json.dumps(given)).document() == given


def _profile() -> dict[str, Any]:
    point = {
        "offered_rps": 20.0, "achieved_rps": 20.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0,
        "cpu_cores": 0.1, "peak_rss_bytes": 100 << 20, "batch_rows_mean": None,
    }  # fmt: skip
    return {
        "schema": SCHEMA,
        "model": {"file": "m.onnx", "sha256": "a" * 64, "bytes": 10},
        "target": {"rps": 20.0, "max_p99_ms": 50.0, "memory_headroom": 0.2, "cpu_headroom": 0.25},
        "recommendation": {
            "met": True,
            "why": "least CPU",
            "settings": {"EDGEML_MAX_BATCH": "8"},
            "createOptions": {"HostConfig": {"Memory": 128 << 20, "NanoCpus": 10**9}},
            "predicted": {
                "p99_ms": 2.0,
                "swap_window_p99_ms": 3.0,
                "swap_window_s": 2.0,
                "peak_rss_bytes": 110 << 20,
                "steady_rss_bytes": 100 << 20,
                "swap_transient_bytes": 10 << 20,
                "cpu_cores": 0.1,
            },
        },
        "configurations": [
            {
                "knobs": {
                    "intra_op_threads": 1,
                    "max_batch": 8,
                    "worker_threads": 1,
                    "batching": True,
                },
                "settings": {"EDGEML_MAX_BATCH": "8"},
                "verdict": "meets the target",
                "error": None,
                "load_rss_bytes": 90 << 20,
                "points": [point],
                "swap": None,
            }
        ],
        "host": {
            "limits": {
                "cgroup": "none",
                "memory_limit_bytes": None,
                "cpu_quota_cores": None,
                "cpus_allowed": 2,
                "cpus": 2.0,
            },
            "python": "3.12.0",
            "onnxruntime": "1.20.0",
            "profiled": "2026-12-08T00:00:00+00:00",
        },
        "plan": {
            "loads_rps": [20.0],
            "warmup_s": 1.0,
            "measure_s": 4.0,
            "swap_rps": 20.0,
            "load": "open loop",
        },
    }


def test_a_written_profile_round_trips_and_reads_back_for_a_deployment() -> None:
    text = json.dumps(_profile())
    written = Profile.model_validate_json(text)
    assert written.document() == _profile()
    read = read_profile(text)
    assert isinstance(read, ProfileDocument)
    assert read.recommendation.createOptions.HostConfig.Memory == 128 << 20


def test_the_written_profile_is_closed_and_the_deployment_reading_is_open() -> None:
    text = json.dumps({**_profile(), "surprise": 1})
    with pytest.raises(ValidationError, match="surprise"):
        Profile.model_validate_json(text)
    assert read_profile(text).recommendation.met

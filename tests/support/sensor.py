"""A sensor module: a real azure-iot-device client sending infer requests over its route."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from azure.iot.device import IoTHubModuleClient, Message

SENSOR = "sensor"


@contextmanager
def sensor_client(connection_string: str, ca_cert: Path) -> Iterator[IoTHubModuleClient]:
    client = IoTHubModuleClient.create_from_connection_string(
        connection_string, server_verification_cert=ca_cert.read_text()
    )
    client.connect()
    try:
        yield client
    finally:
        client.shutdown()


def infer_request(request_id: str, rows: np.ndarray) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ],
    }


def send_infer(client: IoTHubModuleClient, correlation_id: str, rows: np.ndarray) -> None:
    message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        json.dumps(infer_request(correlation_id, rows)),
        message_id=f"msg-{correlation_id}",
        content_encoding="utf-8",
        content_type="application/json",
    )
    message.correlation_id = correlation_id
    client.send_message_to_output(message, "samples")


@functools.cache
def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def reference(model: bytes, rows: np.ndarray) -> np.ndarray:
    """What ONNX Runtime itself computes for `rows` (the module's answers must agree)."""
    session = _session(model)
    output = session.run(None, {session.get_inputs()[0].name: rows})[0]
    return np.asarray(output)

"""One transport-neutral Open Inference Protocol v2 inference: decode -> look up -> infer -> encode.

HTTP (`agent.serving.http`) and the IoT Edge route (`module.routes`) answer through this one
path, so a request means the same thing whichever way it came. Every `RequestError` leaving
`infer_v2` is accounted for: refusals made here are counted here, the model's own (validation,
not ready) by the inference service; a failure of ours is logged once and raised as
`InferenceError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import structlog

from agent.observation.metrics import InferenceMetrics
from agent.serving.contract import RequestError
from agent.serving.protocol import (
    EncodedResponse,
    InferRequest,
    decode_infer_request,
    encode_infer_response,
)
from wire.contract import ModelContract
from wire.reasons import AgentError, Reason

log = structlog.get_logger(__name__)


class ModelMetadataView(Protocol):
    """What the API shows of a model (`agent.serving.inference.ModelMetadata` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def versions(self) -> tuple[int, ...]: ...
    @property
    def platform(self) -> str: ...
    @property
    def contract(self) -> ModelContract: ...
    @property
    def parameters(self) -> Mapping[str, str | int | float | bool]: ...


class ServedModel(Protocol):
    """One served model name (`agent.serving.inference.InferenceService` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    def metadata(self) -> ModelMetadataView: ...
    async def infer_versioned(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        request_id: str | None = None,
    ) -> tuple[int, dict[str, np.ndarray]]: ...


class InferenceError(AgentError):
    """The model failed on a request it had accepted: ours to fix, logged with its traceback."""

    def __init__(self, model: str) -> None:
        super().__init__(
            Reason.INFERENCE_FAILED, f"inference failed on model {model!r}; see the agent log"
        )


async def infer_v2(
    models: Mapping[str, ServedModel],
    name: str,
    body: bytes,
    *,
    metrics: InferenceMetrics,
    max_input_bytes: int,
    header_length: int | None = None,
    json_only: bool = False,
    correlation_id: str | None = None,
) -> EncodedResponse:
    """The encoded v2 response to `body` for model `name`.

    `json_only` answers every output as JSON whatever the request asked (transports without
    the binary-data header extension, such as route messages). The prediction is kept for
    feedback under `correlation_id` (a route message's), else the request's own `id`.
    """
    model = models.get(name)
    if model is None:
        metrics.reject(Reason.UNKNOWN_MODEL)
        raise RequestError(Reason.UNKNOWN_MODEL, f"unknown model {name[:200]!r}")
    try:
        request = decode_infer_request(body, header_length, max_input_bytes=max_input_bytes)
    except RequestError as error:
        metrics.reject(error.reason)
        raise
    if json_only:
        request = _json_outputs(request)
    try:
        version, outputs = await model.infer_versioned(
            request.inputs, request.output_names, request_id=correlation_id or request.id
        )
    except RequestError:
        raise  # counted by the inference service, which sees every request reaching a model
    except Exception:
        log.exception("infer_failed", model=model.name)
        raise InferenceError(model.name) from None
    # An encoding refusal (an output the request named wrongly for its datatype) is not a
    # second count: inference succeeded and was counted as such.
    return encode_infer_response(
        model_name=model.name, model_version=version, request=request, outputs=outputs
    )


def _json_outputs(request: InferRequest) -> InferRequest:
    return dataclasses.replace(
        request,
        outputs=tuple(dataclasses.replace(o, binary_data=False) for o in request.outputs),
        parameters={k: v for k, v in request.parameters.items() if k != "binary_data_output"},
    )

"""KServe's Python model server with an ONNX Runtime model: the baseline of `bench.http`.

Runs under `.venv-kserve/bin/python` (kserve's pins clash with the project's), so it imports
neither `agent` nor anything of this repository. KServe 0.21's v2 REST `infer` handler decodes
the JSON body into an `InferRequest` and awaits `Model.__call__`, which calls a synchronous
`predict` inline on the event loop (KServe's own sklearn/xgboost servers work the same way);
`predict` returns an `InferResponse` that the handler encodes back to v2 JSON.

    .venv-kserve/bin/python -P bench/_kserve_server.py --model_path M.onnx --model_name tiny \\
        --http_port 8080 --workers 1 --enable_grpc false

The session matches the agent's: one intra-op and one inter-op thread, no spinning threads,
all graph optimisations (ORT's default), CPU provider.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, model_server
from kserve.utils.utils import generate_uuid

# ONNX element types -> v2 datatypes, for the outputs these benchmarks produce.
_V2_TYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
}


class OnnxModel(kserve.Model):  # type: ignore[misc]  # kserve ships no type information
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self._path = path
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self._outputs: list[str] = []

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            self._path, options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> Any:
        assert self._session is not None
        request = payload.inputs[0]
        arrays = self._session.run(self._outputs, {self._input: request.as_numpy()})
        outputs = []
        for name, array in zip(self._outputs, arrays, strict=True):
            output = InferOutput(
                name=name, shape=list(array.shape), datatype=_V2_TYPES[array.dtype]
            )
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        # The v2 response schema requires an id; requests may omit theirs.
        return InferResponse(
            response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=outputs
        )


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="ONNX file to serve")
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path)
    model.load()
    server = kserve.ModelServer(
        http_port=args.http_port,
        workers=args.workers,
        enable_grpc=args.enable_grpc,
        enable_latency_logging=False,
    )
    # Like the agent, no log line per request: uvicorn's access log and KServe's timing trace
    # (two lines per request) would cost KServe writes that the agent does not pay. The timing
    # middleware itself still runs: it is part of KServe's request path.
    for per_request in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(per_request).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()

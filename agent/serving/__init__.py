"""Serving: ONNX sessions, micro-batching, the request contract, the OIP v2 codec and HTTP."""

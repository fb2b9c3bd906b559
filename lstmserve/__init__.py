"""lstmserve: serve LSTM models step by step over gRPC.

Parts: `lstmserve.export` (train and export to ONNX), `lstmserve.server`
(the gRPC server on ONNX Runtime), `lstmserve.client` (the Python client).
"""

__version__ = "0.1.0"

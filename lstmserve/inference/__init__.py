"""The Open Inference Protocol (KServe V2 gRPC, Triton's `inference` package), generated from
proto/lstmserve/inference/ by `make proto`.

The messages live in a descriptor pool of their own (`_pool`), not protobuf's default pool:
Triton's client library registers the same `inference.*` names in the default pool, and one
process may import both (a test does).
"""

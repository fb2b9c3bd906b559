"""Prometheus metrics of one server, in a registry of its own (several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lstmserve.server.statistics import InferenceStatistics

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The server's metrics, all prefixed `lstmserve_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("lstmserve_active_sessions", "Live sessions.", registry=r)
        self.queue_depth = Gauge("lstmserve_queue_depth", "Requests waiting for the batcher.", registry=r)
        self.steps = Counter("lstmserve_steps", "Step requests computed.", registry=r)
        self.tokens = Counter("lstmserve_tokens", "Positions (tokens or feature rows) computed.", registry=r)
        self.generated_tokens = Counter("lstmserve_generated_tokens", "Tokens produced by generation.", registry=r)
        self.batch_size = Histogram(
            "lstmserve_batch_size", "Sessions per ONNX Runtime call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_latency = Histogram(
            "lstmserve_step_latency_seconds",
            "Time from a step request's arrival at the batcher to its result (a generation: to its last token).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_latency = Histogram(
            "lstmserve_compute_seconds", "Time of one batch: gather, ONNX Runtime, scatter.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.evictions = Counter("lstmserve_evictions", "Sessions closed because they idled past the TTL.", registry=r)
        self.sessions_created = Counter("lstmserve_sessions_created", "Sessions created.", registry=r)
        self.errors = Counter("lstmserve_errors", "Requests that failed, by gRPC status code.", ["code"], registry=r)
        self.handoffs = Counter(
            "lstmserve_handoffs", "Sessions this replica gave up to another one (written to the shared store).", registry=r
        )
        self.takeovers = Counter(
            "lstmserve_takeovers",
            "Sessions this replica took over from the shared store, by source: 'handoff' (a live replica gave "
            "it up on request) or 'store' (it was there: drained, spilled, or its replica died).",
            ["source"],
            registry=r,
        )
        # Triton-style per-inference and per-batch totals of the batcher (the Open Inference Protocol's
        # ModelStatistics); kept apart from the Prometheus registry.
        self.statistics = InferenceStatistics()

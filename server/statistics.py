"""Per-request and per-execution statistics of one model, in the shape of Triton's ModelStatistics.

In the batcher a *request* is one row of a batch: one step of one session (a step request, or one
token of a generation); an *execution* is one batch (the scheduler's gather, ONNX Runtime call(s)
and scatter). The stateless model runs each request alone: one execution, as many *inferences* as
the request has rows. As Triton does, every request of an execution is charged the execution's
whole compute time, so the per-request figures (queue, compute input/infer/output, success) all
have the same count, and the per-execution figures live in `executions` and `batches` (by size).

Plain integers (nanoseconds), updated on the event loop only: no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and their total duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, ns: int) -> None:
        """Adds `count` occurrences lasting `ns` nanoseconds in all."""
        self.count += count
        self.ns += ns


@dataclass
class BatchTotals:
    """The executions of one batch size: how many, and their compute time by phase (not per row)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(frozen=True)
class BatchTiming:
    """When one execution started computing and how long each phase took, in seconds.

    Args:
        started: time.perf_counter() when its compute began (the end of every row's wait).
        input_s: gathering inputs and state into the batch buffers (Triton's compute_input).
        infer_s: the model call(s) (compute_infer).
        output_s: scattering the state back (compute_output).
    """

    started: float
    input_s: float
    infer_s: float
    output_s: float


class InferenceStatistics:
    """Running totals for one model (see the module docstring for what is counted)."""

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.executions = 0
        self.inferences = 0
        self.batches: dict[int, BatchTotals] = {}
        self.last_inference_ms = 0  # milliseconds since the epoch of the last execution (0: none)

    def record(
        self, batch_size: int, timing: BatchTiming, requests: int, waiting_since_sum: float, finished: float,
        inferences: int | None = None,
    ) -> None:
        """Records one execution of `batch_size` rows and the `requests` it answered.

        Args:
            batch_size: the rows the execution computed.
            timing: when it started computing and how long its phases took.
            requests: the requests it computed successfully (in the batcher, one per row).
            waiting_since_sum: the sum, over those requests, of the perf_counter() time each began waiting.
            finished: perf_counter() when their results were ready.
            inferences: the rows of those requests (default: one per request).
        """
        self.executions += 1
        totals = self.batches.get(batch_size)
        if totals is None:
            totals = self.batches[batch_size] = BatchTotals()
        input_ns, infer_ns, output_ns = _ns(timing.input_s), _ns(timing.infer_s), _ns(timing.output_s)
        totals.compute_input.add(1, input_ns)
        totals.compute_infer.add(1, infer_ns)
        totals.compute_output.add(1, output_ns)
        self.last_inference_ms = int(time.time() * 1000)
        if requests <= 0:
            return
        self.inferences += requests if inferences is None else inferences
        self.queue.add(requests, max(0, _ns(requests * timing.started - waiting_since_sum)))
        self.success.add(requests, max(0, _ns(requests * finished - waiting_since_sum)))
        self.compute_input.add(requests, requests * input_ns)
        self.compute_infer.add(requests, requests * infer_ns)
        self.compute_output.add(requests, requests * output_ns)

    def failed(self, seconds: float) -> None:
        """Records a request that failed after `seconds`."""
        self.fail.add(1, _ns(seconds))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)

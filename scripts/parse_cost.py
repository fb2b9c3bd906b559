"""What validating one Step request costs the servicer, in-process: `LstmServeService._parse` on a one-token step and
on a one-token coalescing generation request (32 tokens at temperature 1).

Usage: .venv/bin/python scripts/parse_cost.py [MODEL]   (default models/default/model.onnx)
Prints the best of five runs of 20,000 calls each, in microseconds per call. Every step and generation request
passes through `_parse` on the event loop, before the batching engine sees it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lstmserve.server.config import ServerConfig
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.service import LstmServeService
from lstmserve.v1 import lstmserve_pb2 as pb

CALLS, RUNS = 20_000, 5


def main(model: Path) -> None:
    runner = Runner(model, RunnerOptions(intra_op_threads=1))
    # _parse reads only the model's spec and the server's limits: no scheduler is needed.
    service = LstmServeService(None, runner, ServerConfig(model=model), Metrics())  # type: ignore[arg-type]
    generation = pb.StepRequest(tokens=[1], output=pb.OUTPUT_NONE)
    generation.generate.max_tokens, generation.generate.coalesce = 32, True
    generation.generate.sampling.temperature = 1.0
    for name, request in (("one-token step", pb.StepRequest(tokens=[1])), ("generation request", generation)):
        for _ in range(1000):
            service._parse(request, first=False)
        best = float("inf")
        for _ in range(RUNS):
            started = time.perf_counter()
            for _ in range(CALLS):
                service._parse(request, first=False)
            best = min(best, (time.perf_counter() - started) / CALLS)
        print(f"{name}: {best * 1e6:.2f} us per _parse")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/default/model.onnx"))

"""What the gRPC servicer's own Python adds to generation, in-process and without gRPC: 256 streams through
`LstmServeService.Step` (each an async iterator of coalescing 32-token generation requests, the next sent when the
previous generation finished, as the load generator does) against the same load through `generate()` directly.

Usage: .venv/bin/python scripts/servicer_generation_cost.py servicer|engine [SESSIONS] [MODEL]
(default 256 sessions, models/default/model.onnx). Runs for 6 s on uvloop with two batches in flight and one ONNX
Runtime thread, and prints tokens/s and the process's CPU microseconds per generated token.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from lstmserve.server.app import make_store, scheduler_limits
from lstmserve.server.config import ServerConfig
from lstmserve.server.generation import GenerateParams, generate
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.sampling import SamplingParams
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.service import LstmServeService
from lstmserve.v1 import lstmserve_pb2 as pb

DURATION_S, TOKENS = 6.0, 32


class _Context:
    """The little of a grpc.aio.ServicerContext that Step reads without API keys; a refusal raises."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(details)

    def set_code(self, code: Any) -> None:
        raise RuntimeError(f"refused: {code}")

    def set_details(self, details: str) -> None:
        raise RuntimeError(details)


async def main(mode: str, sessions: int, model: Path) -> None:
    config = ServerConfig(model=model, intra_op_threads=1, max_sessions=sessions + 16, batches_in_flight=2)
    runner = Runner(model, RunnerOptions(providers=config.providers, intra_op_threads=1))
    metrics = Metrics()
    scheduler = Scheduler(runner, make_store(runner, config), scheduler_limits(config), metrics)
    scheduler.start()
    service = LstmServeService(scheduler, runner, config, metrics)
    vocabulary = runner.spec.vocabulary
    params = GenerateParams(max_tokens=TOKENS, sampling=SamplingParams(temperature=1.0), coalesce=True)
    end = time.perf_counter() + DURATION_S
    made = 0

    async def through_servicer(seed: int) -> None:
        nonlocal made
        rng = np.random.default_rng(seed)
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[pb.StepRequest]:
            while time.perf_counter() < end:
                request = pb.StepRequest(tokens=[int(rng.integers(0, len(vocabulary)))], output=pb.OUTPUT_NONE)
                request.generate.max_tokens, request.generate.coalesce = TOKENS, True
                request.generate.sampling.temperature = 1.0
                finished.clear()
                yield request
                await finished.wait()

        async for response in service.Step(requests(), _Context()):
            made += len(response.tokens)
            if response.finished:
                finished.set()

    async def through_engine(seed: int) -> None:
        nonlocal made
        rng = np.random.default_rng(seed)
        session = scheduler.create_session()
        while time.perf_counter() < end:
            prompt = np.array([int(rng.integers(0, len(vocabulary)))])
            async for chunk in generate(scheduler, session, prompt, params, vocabulary):
                made += len(chunk.tokens)

    run = through_servicer if mode == "servicer" else through_engine
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(run(seed) for seed in range(sessions)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{mode}: {made / wall:,.0f} tokens/s, {cpu / made * 1e6:.1f} us of CPU per token")
    await scheduler.close()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("servicer", "engine"):
        sys.exit("usage: servicer_generation_cost.py servicer|engine [SESSIONS] [MODEL]")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    asyncio.run(main(sys.argv[1], count, Path(sys.argv[3]) if len(sys.argv) > 3 else Path("models/default/model.onnx")))

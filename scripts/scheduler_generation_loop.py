"""Generated tokens per second through the scheduler alone, in-process: no gRPC, no load generator.

Usage: .venv/bin/python scripts/scheduler_generation_loop.py [MODEL] [SESSIONS]
(default models/default/model.onnx, 256). Each session generates 32 tokens at temperature 1,
again and again, for 6 s; prints tokens/s and the process's CPU time per token. It isolates the
scheduler's own cost per generated token from what gRPC adds (compare with `lstmserve bench
--mode generate`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

from lstmserve.server.app import make_store
from lstmserve.server.config import ServerConfig
from lstmserve.server.generation import GenerateParams, generate
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.sampling import SamplingParams
from lstmserve.server.scheduler import Scheduler, SchedulerLimits

TOKENS_PER_GENERATION = 32
DURATION_S = 6.0


async def main(model: Path, sessions: int) -> None:
    runner = Runner(model, RunnerOptions(intra_op_threads=1))
    store = make_store(runner, ServerConfig(model=model, max_sessions=sessions + 16))
    scheduler = Scheduler(runner, store, SchedulerLimits(max_batch_size=256), Metrics())
    scheduler.start()
    vocabulary = runner.spec.vocabulary
    params = GenerateParams(max_tokens=TOKENS_PER_GENERATION, sampling=SamplingParams(temperature=1.0), coalesce=True)
    generated = 0
    end = time.perf_counter() + DURATION_S

    async def one(seed: int) -> None:
        nonlocal generated
        session = scheduler.create_session()
        rng = np.random.default_rng(seed)
        while time.perf_counter() < end:
            prompt = rng.integers(0, len(vocabulary), size=1)
            async for chunk in generate(scheduler, session, prompt, params, vocabulary):
                generated += len(chunk.tokens)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(seed) for seed in range(sessions)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{generated / wall:,.0f} tokens/s, {cpu / generated * 1e6:.1f} us of CPU per token, CPU {cpu / wall:.0%}")
    await scheduler.close()


if __name__ == "__main__":
    model_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/default/model.onnx")
    asyncio.run(main(model_path, int(sys.argv[2]) if len(sys.argv) > 2 else 256))

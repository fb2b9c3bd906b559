"""Two batches in flight (`lstmserve serve --batches-in-flight 2`), in-process on a real model (no gRPC).

The same load runs with one batch in flight and with two; every answer must be the same: each stepping
session's logits, each seeded generation's tokens, every session's step counter. The batches differ (with
two in flight the rows waiting are split between two batches), so this also checks that the two lanes'
state buffers and logits buffers never mix.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from lstmserve.bench.engine import build_engine
from lstmserve.server.generation import GenerateParams, generate
from lstmserve.server.sampling import SamplingParams

SESSIONS = 40
STEPS = 6
TOKENS = 12


def run_load(model: Path, batches_in_flight: int) -> tuple[list[np.ndarray], list[list[int]], list[int], set[int]]:
    """Stepping and generating sessions together; returns each stepping session's logits, each generation's
    tokens, every session's step counter after, and the lanes the batches used."""

    async def body() -> tuple[list[np.ndarray], list[list[int]], list[int], set[int]]:
        engine = build_engine(model, max_sessions=2 * SESSIONS + 8, batches_in_flight=batches_in_flight)
        scheduler = engine.scheduler
        lanes: set[int] = set()
        gather = scheduler.store.gather

        def recording_gather(slots: np.ndarray, lane: int = 0) -> Any:
            lanes.add(lane)
            return gather(slots, lane)

        scheduler.store.gather = recording_gather  # type: ignore[method-assign]
        scheduler.start()
        try:
            steppers = [scheduler.create_session() for _ in range(SESSIONS)]
            generators = [scheduler.create_session() for _ in range(SESSIONS)]

            async def stepping(index: int) -> np.ndarray:
                outputs = []
                for k in range(STEPS):
                    result = await scheduler.step(steppers[index], np.array([(index + k) % 20 + 1], np.int64))
                    outputs.append(result.logits)
                return np.concatenate(outputs)

            async def generating(index: int) -> list[int]:
                sampling = SamplingParams(temperature=1.0, seed=index)
                params = GenerateParams(max_tokens=TOKENS, sampling=sampling, coalesce=True)
                prompt = np.array([index % 20 + 1], np.int64)
                made: list[int] = []
                async for chunk in generate(scheduler, generators[index], prompt, params, engine.spec.vocabulary):
                    made += [event.token for event in chunk if not event.finish_reason]
                return made

            logits = await asyncio.gather(*(stepping(i) for i in range(SESSIONS)))
            tokens = await asyncio.gather(*(generating(i) for i in range(SESSIONS)))
            mixed = await asyncio.gather(stepping(0), generating(0))  # both kinds in the same batches
            steps = [s.step for s in steppers + generators]
        finally:
            await scheduler.close()
        return [*logits, mixed[0]], [*tokens, mixed[1]], steps, lanes  # type: ignore[list-item]

    return asyncio.run(body())


def test_two_batches_in_flight_answer_exactly_as_one(token_model: Path) -> None:
    one_logits, one_tokens, one_steps, one_lanes = run_load(token_model, 1)
    two_logits, two_tokens, two_steps, two_lanes = run_load(token_model, 2)
    assert one_lanes == {0} and two_lanes == {0, 1}
    for index, (alone, beside) in enumerate(zip(one_logits, two_logits, strict=True)):
        np.testing.assert_array_equal(beside, alone, err_msg=f"stepping session {index}")
    assert two_tokens == one_tokens and all(len(made) == TOKENS for made in two_tokens)
    assert two_steps == one_steps == [2 * STEPS] + [STEPS] * (SESSIONS - 1) + [2 * (1 + TOKENS)] + [1 + TOKENS] * (SESSIONS - 1)

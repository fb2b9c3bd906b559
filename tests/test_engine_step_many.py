"""Scheduler.step_many in-process, on a real model (no gRPC): blocks, queued sessions, and resends.

The engine is built as the bench builds it (`bench/engine.py: build_engine`, as `lstmserve serve` does);
each expected value comes from the same sessions stepped one at a time with `Scheduler.step`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from lstmserve.bench.engine import build_engine
from lstmserve.server.errors import InvalidInput, SessionNotFound, StepMismatch
from lstmserve.server.sessions import StepResult


def tokens(*ids: int) -> np.ndarray:
    return np.array(ids, np.int64)


def test_step_many_answers_each_session_as_step_would(token_model: Path) -> None:
    """Blocks (sessions with nothing queued), a session with a step still queued (its entry waits behind it),
    a resend of a step that is still queued (answered again, not applied twice) and refusals, in one call."""

    async def body() -> None:
        engine = build_engine(token_model, max_sessions=16)
        scheduler = engine.scheduler
        scheduler.start()
        try:
            alone = [scheduler.create_session() for _ in range(4)]
            together = [scheduler.create_session() for _ in range(5)]
            expected = [await scheduler.step(s, tokens(3, i + 1)) for i, s in enumerate(alone)]
            expected += [await scheduler.step(alone[0], tokens(7))]  # the queued session's second step
            closed = scheduler.create_session()
            await scheduler.close_session(closed.id)

            first = tokens(3, 1)
            queued = asyncio.ensure_future(scheduler.step(together[0], first))  # not run yet when step_many starts
            resent = asyncio.ensure_future(scheduler.step(together[4], tokens(5, 5), 0))
            await asyncio.sleep(0)
            outcomes = await scheduler.step_many(
                [
                    (together[0], tokens(7), None),  # waits behind its queued step
                    (together[1], tokens(3, 2), None),
                    (together[2], tokens(3, 3), 0),
                    (together[3], tokens(3, 4), 5),  # a mismatch
                    (closed, tokens(1), None),
                    (together[1], tokens(1), None),  # the same session twice
                    (together[4], tokens(5, 5), 0),  # a resend of a step still queued: waits, then is answered again
                ]
            )
            first_result = await queued
            assert outcomes[6] is await resent and together[4].step == 2
            assert isinstance(outcomes[0], StepResult) and outcomes[0].start_step == 2
            np.testing.assert_array_equal(first_result.logits, expected[0].logits)
            np.testing.assert_array_equal(outcomes[0].logits, expected[4].logits)
            for outcome, reference in zip(outcomes[1:3], expected[1:3], strict=True):
                assert isinstance(outcome, StepResult) and outcome.step == 2
                np.testing.assert_array_equal(outcome.logits, reference.logits)
            assert isinstance(outcomes[3], StepMismatch)
            assert isinstance(outcomes[4], SessionNotFound)
            assert isinstance(outcomes[5], InvalidInput) and "twice" in str(outcomes[5])
            assert [s.step for s in together] == [3, 2, 2, 0, 2]

            # A resend of an applied step (same input, expected_step where it started) is answered again.
            again = await scheduler.step_many([(together[2], tokens(3, 3), 0), (together[3], tokens(3, 4), 0)])
            assert isinstance(again[0], StepResult) and again[0] is together[2].last_result
            assert isinstance(again[1], StepResult) and again[1].start_step == 0
            assert together[2].step == 2 and together[3].step == 2
        finally:
            await scheduler.close()

    asyncio.run(body())

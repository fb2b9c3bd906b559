"""Two batches in flight (`lstmserve serve --batches-in-flight 2`), in-process on a real model (no gRPC).

The same load runs with one batch in flight and with two; every answer must be the same: each stepping
session's logits, each seeded generation's tokens, every session's step counter. The batches differ (with
two in flight the rows waiting are split between two batches), so this also checks that the two lanes'
state buffers and logits buffers never mix.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lstmserve.bench.engine import build_engine
from lstmserve.server.batcher import Block, Work
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
        return [*logits, mixed[0]], [*tokens, mixed[1]], steps, lanes

    return asyncio.run(body())


def test_two_batches_in_flight_answer_exactly_as_one(token_model: Path) -> None:
    one_logits, one_tokens, one_steps, one_lanes = run_load(token_model, 1)
    two_logits, two_tokens, two_steps, two_lanes = run_load(token_model, 2)
    assert one_lanes == {0} and two_lanes == {0, 1}
    for index, (alone, beside) in enumerate(zip(one_logits, two_logits, strict=True)):
        np.testing.assert_array_equal(beside, alone, err_msg=f"stepping session {index}")
    assert two_tokens == one_tokens and all(len(made) == TOKENS for made in two_tokens)
    assert two_steps == one_steps == [2 * STEPS] + [STEPS] * (SESSIONS - 1) + [2 * (1 + TOKENS)] + [1 + TOKENS] * (SESSIONS - 1)


def test_with_two_in_flight_session_copies_wait_for_no_batch_computing(token_model: Path) -> None:
    """A checkpoint's copies are taken between batches: with a batch computing in a lane (the worker is held
    by the test, so it cannot finish), the copies wait, and no new batch starts meanwhile; once it is done, each
    copy's state is the state its step counter says."""

    async def body() -> None:
        engine = build_engine(token_model, max_sessions=8, batches_in_flight=2)
        scheduler = engine.scheduler
        scheduler.start()
        release = threading.Event()
        try:
            first, second = scheduler.create_session(), scheduler.create_session()
            prompt = np.arange(1, 17, dtype=np.int64)  # longer than a step run inline: it goes to the worker
            scheduler._executor.submit(release.wait)  # the worker's one thread is busy until released
            running = asyncio.ensure_future(scheduler.step(first, prompt))
            for _ in range(1000):  # until the batch is handed to the worker: the loop's own turns, no timing
                if scheduler._computing:
                    break
                await asyncio.sleep(0)
            assert scheduler._computing == 1
            copies = asyncio.ensure_future(scheduler.copy_all_sessions())
            later = asyncio.ensure_future(scheduler.step(second, prompt))
            for _ in range(50):
                await asyncio.sleep(0)
            assert not copies.done() and not running.done() and not later.done()
            assert second.in_flight is False  # no second batch started while the copies wait
            release.set()
            taken = {copy.session.id: copy for copy in await copies}
            await asyncio.gather(running, later)
            reference = scheduler.create_session()
            await scheduler.step(reference, prompt)
            assert taken[first.id].step == 16 and taken[second.id].step == 0
            np.testing.assert_array_equal(taken[first.id].state.h, scheduler.store.read(reference.slot).h)
            assert not taken[second.id].state.h.any()
        finally:
            release.set()
            await scheduler.close()

    asyncio.run(body())


def test_with_two_in_flight_the_room_keeps_the_batch_limit_and_lets_a_block_in(token_model: Path) -> None:
    async def body() -> None:
        small = build_engine(token_model, max_sessions=64, max_batch_size=8, batches_in_flight=2).scheduler
        for session in [small.create_session() for _ in range(40)]:
            small.batcher.enqueue(session, Work(future=asyncio.get_running_loop().create_future(), inputs=np.array([1])))
        assert small._room() == 8  # never more than --max-batch-size, however many wait

        large = build_engine(token_model, max_sessions=256, max_batch_size=128, batches_in_flight=2).scheduler
        members = [large.create_session() for _ in range(100)]
        inputs = np.ones((100, 1), np.int64)
        large.batcher.enqueue_block(Block(members, inputs, [b""] * 100, asyncio.get_running_loop().create_future()))
        large._rows_computing = 20  # a batch of 20 rows computing: half of all would be 60 rows
        assert large._room() == 100  # the oldest block fits, rather than wait behind smaller batches

    asyncio.run(body())


def test_with_two_in_flight_lanes_go_on_by_themselves_and_still_let_copies_in(token_model: Path) -> None:
    """Under a load that never pauses (generations without end), the lanes form their next batches themselves
    (`_next_in_lane`), and a checkpoint's copies still get their turn between batches: a lane hands back to the
    batching loop when copies are due, and the copies are taken while the generations go on."""

    async def body() -> None:
        engine = build_engine(token_model, max_sessions=16, batches_in_flight=2)
        scheduler = engine.scheduler
        formed_by_lanes = 0
        next_in_lane = scheduler._next_in_lane

        def counting() -> Any:
            nonlocal formed_by_lanes
            taken, columns = next_in_lane()
            formed_by_lanes += bool(taken or columns)
            return taken, columns

        scheduler._next_in_lane = counting  # type: ignore[method-assign]
        scheduler.start()
        sessions = [scheduler.create_session() for _ in range(8)]
        params = GenerateParams(max_tokens=1_000_000, sampling=SamplingParams(temperature=1.0), coalesce=True)
        made = [0] * len(sessions)

        async def generating(index: int) -> None:
            prompt = np.array([index + 1], np.int64)
            async for chunk in generate(scheduler, sessions[index], prompt, params, engine.spec.vocabulary):
                made[index] += len(chunk)

        running = [asyncio.ensure_future(generating(i)) for i in range(len(sessions))]
        try:
            while min(made) < 20:  # every generation under way (the loop's own turns, no timing)
                await asyncio.sleep(0)
            copies = await asyncio.wait_for(scheduler.copy_all_sessions(), timeout=60)  # a hang fails, not a delay
            assert not any(task.done() for task in running)  # taken while the generations went on
            assert {copy.session.id for copy in copies} == {session.id for session in sessions}
            assert all(copy.step >= 20 for copy in copies)
            assert formed_by_lanes > 0
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await scheduler.close()

    asyncio.run(body())

"""Random schedules of the batcher against what each generation must stream, driven with a fake model.

Each scenario, from its seed: sessions start generations (some with a stop string, some coalescing, several
at once on one session), step, close (the slot freed is the next one reused), and clients go away; batches
are formed with random room and finished in random order with one or two in flight; each generation's
stream is a coroutine that takes its tokens when woken, some of them late. The fake model's greedy token
is the input plus one, so every generation's tokens are known in advance. Checked at the end: every
stream ended; each got exactly its tokens, in order (all of them, or up to its stop string, or a prefix if
it went away or failed); the steps of a session's tokens never repeat across its generations and rise
within one; each token carries the size of the batch that computed it. A token log row of 2 tokens makes
the moved-out backlog, a row changing hands with tokens untaken and wrap-around happen often.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from lstmserve.server.batcher import Batcher, Columns, Computed, SchedulerLimits, Taken, Work, group_by_length
from lstmserve.server.errors import SessionNotFound
from lstmserve.server.generation import GeneratedToken, GenerateParams, Generation
from lstmserve.server.metrics import Metrics
from lstmserve.server.sampling import SamplingParams
from lstmserve.server.sessions import Session
from lstmserve.server.statistics import BatchTiming
from lstmserve.server.token_log import TokenLog

VOCAB = 512
VOCABULARY = [f"<{i}>" for i in range(VOCAB)]
TIMING = BatchTiming(0.0, 0.0, 0.0, 0.0)


def fake_model(group: Computed) -> np.ndarray:
    """Logits [rows, positions, VOCAB]: one-hot of each input token plus one (the greedy next token)."""
    inputs = group.inputs()
    logits = np.zeros((*inputs.shape, VOCAB), np.float32)
    np.put_along_axis(logits, ((inputs + 1) % VOCAB)[..., np.newaxis], 1.0, axis=-1)
    return logits


@dataclass
class Stream:
    """One generation and what its client received."""

    generation: Generation
    work: Work
    session: Session
    prompt: int
    max_tokens: int
    stop: str | None
    events: list[GeneratedToken] = field(default_factory=list)
    left: bool = False  # the client went away

    def expected(self) -> list[int]:
        """The tokens of the whole generation: up to its stop string's token (not included), or max_tokens."""
        tokens = [(self.prompt + 1 + k) % VOCAB for k in range(self.max_tokens)]
        if self.stop is not None and self.stop in (VOCABULARY[t] for t in tokens):
            return tokens[: [VOCABULARY[t] for t in tokens].index(self.stop)]
        return tokens


async def consume(stream: Stream, rng: random.Random) -> None:
    """What `generation.generate` does with a generation: take its tokens whenever woken, until its request ends."""
    generation, request = stream.generation, stream.work.future
    while True:
        await generation.changed.wait()
        for _ in range(rng.choice([0, 0, 0, 1, 3])):  # a client that reads late
            await asyncio.sleep(0)
        stream.events.extend(generation.take())
        if request.done():
            if stream.left:
                generation.abandon()
            else:
                stream.events.extend(generation.take())
                generation.detach()
            return


async def scenario(seed: int, lanes: int, width: int) -> tuple[list[Stream], dict[tuple[str, int], int]]:
    """Runs one random schedule to its end; returns the streams and the batch size of every (session, step)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    batcher = Batcher(SchedulerLimits(max_batch_size=rng.choice([2, 3, 8, 64])), Metrics())
    batcher.token_log = TokenLog(width=width)
    free_slots = list(range(8))
    live: dict[str, Session] = {}
    streams: list[Stream] = []
    consumers: list[asyncio.Task[None]] = []
    batch_sizes: dict[tuple[str, int], int] = {}
    in_flight: list[tuple[Taken, list[Columns]]] = []

    created = iter(range(1_000_000))

    def new_session() -> None:
        if free_slots:
            session = Session(id=f"session-{next(created):06d}-{seed:06d}", slot=free_slots.pop(), owner="")
            live[session.id] = session

    def drop(session: Session) -> None:
        batcher.discard(session, SessionNotFound("closed"))
        session.queued_positions = 0
        del live[session.id]
        free_slots.append(session.slot)  # reused first

    def start_generation(session: Session) -> None:
        max_tokens = rng.choice([1, 2, 3, width, width + 1, 2 * width + 3, rng.randint(1, 60)])
        prompt = rng.randrange(VOCAB)
        stop = VOCABULARY[(prompt + rng.randint(1, max_tokens + 3)) % VOCAB] if rng.random() < 0.2 else None
        params = GenerateParams(
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0.0),
            stop=() if stop is None else (stop,),
            coalesce=rng.random() < 0.5,
        )
        generation = Generation(params, VOCABULARY)
        work = Work(future=loop.create_future(), inputs=np.array([prompt], np.int64), generation=generation)
        batcher.enqueue(session, work)
        batcher.generation_started(work.future)  # as Scheduler.start_generation does
        work.future.add_done_callback(generation.request_done)  # as generate() does
        stream = Stream(generation, work, session, prompt, max_tokens, stop)
        streams.append(stream)
        consumers.append(asyncio.ensure_future(consume(stream, random.Random(rng.random()))))

    def finish_batch(taken: Taken, columns: list[Columns]) -> None:
        groups: list[Computed] = [*columns, *(group_by_length(taken) if taken else [])]
        batcher.finish(groups, [fake_model(g) for g in groups], TIMING)
        size = sum(len(g.sessions) for g in groups)
        for group in groups:
            for session in group.sessions:
                batch_sizes[(session.id, session.step)] = size
        batcher.requeue(taken, set(live.values()), columns)

    for _ in range(4):
        new_session()
    for _ in range(rng.randint(50, 400)):
        sessions, draw = list(live.values()), rng.random()
        if draw < 0.12 and sessions:
            start_generation(rng.choice(sessions))
        elif draw < 0.14 and sessions:  # a close, queued behind the session's work
            batcher.enqueue(rng.choice(sessions), Work(future=loop.create_future(), op=drop))
        elif draw < 0.17:
            new_session()
        elif draw < 0.19:  # a client goes away
            running = [s for s in streams if not s.work.future.done()]
            if running:
                stream = rng.choice(running)
                stream.left = True
                stream.work.future.cancel()
        elif draw < 0.21 and sessions:  # a plain step
            batcher.enqueue(
                rng.choice(sessions), Work(future=loop.create_future(), inputs=np.array([rng.randrange(VOCAB)]))
            )
        if len(in_flight) < lanes and rng.random() < 0.8:
            taken, columns = batcher.collect_batch(rng.choice([None, 1, 2, 5]))
            if taken or columns:
                in_flight.append((taken, columns))
        if in_flight and rng.random() < 0.7:
            finish_batch(*in_flight.pop(rng.randrange(len(in_flight))))
        batcher.generating = sum(not s.work.future.done() for s in streams)
        await asyncio.sleep(0)
    for _ in range(20_000):  # then run everything to its end
        if in_flight:
            finish_batch(*in_flight.pop(0))
        else:
            taken, columns = batcher.collect_batch()
            if taken or columns:
                finish_batch(taken, columns)
        batcher.generating = sum(not s.work.future.done() for s in streams)
        for _ in range(4):
            await asyncio.sleep(0)
        if all(task.done() for task in consumers) and not in_flight and not batcher.carried and not batcher.ready:
            break
    assert all(task.done() for task in consumers), "a stream never saw its generation end"
    return streams, batch_sizes


@pytest.mark.parametrize("width", [2, 128])
@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("seed", range(8))
def test_random_schedules_stream_every_generation_exactly_its_tokens(seed: int, lanes: int, width: int) -> None:
    streams, batch_sizes = asyncio.run(scenario(seed, lanes, width))
    steps_seen: dict[tuple[str, int], int] = {}
    for index, stream in enumerate(streams):
        tokens, steps = [e.token for e in stream.events], [e.step for e in stream.events]
        expected, request = stream.expected(), stream.work.future
        completed = not request.cancelled() and request.exception() is None
        if completed:
            assert tokens == expected, (index, stream.generation.finish_reason)
            assert request.result().step >= (steps[-1] if steps else 0)
        else:  # went away, or its session was closed under it: what it got is a prefix
            assert tokens == expected[: len(tokens)], index
        assert all(a < b for a, b in zip(steps, steps[1:])), index
        for event in stream.events:
            key = (stream.session.id, event.step)
            assert key not in steps_seen, (index, steps_seen.get(key))
            steps_seen[key] = index
            assert batch_sizes[key] == event.batch_size, (index, event)

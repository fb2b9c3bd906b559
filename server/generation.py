"""Server-side generation: feed the prompt, then sample and feed one token at a time.

A generation runs inside the scheduler's batching loop: after each step of a
generating session the scheduler samples the next token (for all generating rows
of the batch at once) and queues it straight back, so a generated token costs no
trip through the request's coroutine. The `Generation` object carries the tokens
out to the coroutine that streams them, which sends whatever has accumulated.
The session consumes the prompt and every generated token (including a stop
string's tokens), so a later step continues from the end of the generation.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from lstmserve.server.sampling import Sampler, SamplingParams
from lstmserve.server.sessions import Session
from lstmserve.server.stops import StopMatcher

if TYPE_CHECKING:
    from lstmserve.server.scheduler import Scheduler


@dataclass(frozen=True)
class GenerateParams:
    """A generation request: how many tokens at most, how to sample, where to stop, and whether
    one response may carry several tokens."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    coalesce: bool = False


class GeneratedToken(NamedTuple):
    """One generated token and its text; `finish_reason` is set on the last event only.

    A named tuple, not a dataclass: one is made per generated token, in the batching loop.
    """

    token: int
    text: str
    step: int
    batch_size: int
    finish_reason: str = ""


# Makes a GeneratedToken from a tuple of all its fields without a Python-level call: a quarter less time per
# token than GeneratedToken(...) in `Generation.take`, which makes one per generated token.
_new_event = functools.partial(tuple.__new__, GeneratedToken)

# With coalescing, a generation hands its tokens to the streaming coroutine in chunks sized so
# that N generating sessions send about this many responses per token each makes: a response
# costs the event loop tens of microseconds, so one response per token per session would make
# gRPC, not the model, the limit. A session generating alone still gets every token at once.
RESPONSES_PER_ROUND = 32


class Wakeup:
    """Wakes one waiting coroutine: `set` makes the next (or the current) `wait` return, once.

    It does what `wait()` then `clear()` on an asyncio.Event did here, but asyncio.Event looks the
    running loop up on every wait, and on Python 3.11 that is a getpid system call: once per response
    of every generation (`py-spy record --native` of the server under `lstmserve bench --mode generate`
    showed 3% of the event loop's time in it). This one is bound to the loop it is given (the running
    one if none: a lookup per generation was 7% of the batching engine's thread with 4,096 sessions
    generating, in `py-spy record` of `lstmserve bench --series engine --model models/tiny/model.onnx`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Wakes the waiting coroutine, or the next one to wait."""
        self._is_set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Returns once `set` was called since the last wait returned."""
        if not self._is_set:
            assert self._waiter is None, "a Wakeup has one waiter at a time"
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._is_set = False


class Generation:
    """One running generation: what the scheduler needs to continue it, and the tokens it made so far.

    The batcher calls `consumed_token` after every step that fed a generated token (or `consumed` with the
    token in `fed`, when the step went through the session's queue); the streaming coroutine calls `take`.
    """

    def __init__(
        self, params: GenerateParams, vocabulary: Sequence[str], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.max_tokens = params.max_tokens
        self._coalesce = params.coalesce
        self.sampler = Sampler(params.sampling)
        self.fed: int | None = None  # the generated token the queued step feeds (None: the prompt)
        self.finish_reason = ""
        self._matcher = StopMatcher(params.stop)
        self._vocabulary = vocabulary
        self._count = 0
        self._events: list[GeneratedToken] = []  # released by the stop matcher, with their text
        self._made: list[tuple[int, int, int]] = []  # (token, step, batch size) of tokens made without stop strings
        self._taken_any = False
        self.changed = Wakeup(loop)  # set when tokens are ready or the generation ended

    def consumed(self, step: int, batch_size: int, generating: int) -> bool:
        """Records that the session's step that fed `fed` ran (see `consumed_token`); the prompt's step (`fed` None)
        finishes nothing."""
        token = self.fed
        if token is None:  # the prompt was fed: the first token is still to be sampled
            return False
        return self.consumed_token(token, step, batch_size, generating)

    def consumed_token(self, token: int, step: int, batch_size: int, generating: int) -> bool:
        """Records that the session's step feeding the generated `token` ran (now at `step`, in a batch of
        `batch_size`, with `generating` generations running in all); returns whether the generation is finished.

        Runs for every generated token, in the batching loop, while the model waits: without stop strings
        it only notes the token; its text and event are made by `take`, in the streaming coroutine, which
        runs while the next batch computes.
        """
        self._count += 1
        finished = self._count >= self.max_tokens
        if self._matcher.stops:
            finished = self._match_stops(token, step, batch_size, finished)
            held = len(self._events)
        else:
            self._made.append((token, step, batch_size))
            held = len(self._made)
            if finished:
                self.finish_reason = "length"
        # The held tokens make a response now if not coalescing, if they are the first, or if they are
        # enough (see RESPONSES_PER_ROUND).
        if held and (not self._coalesce or not self._taken_any or held * RESPONSES_PER_ROUND >= generating):
            self.changed.set()
        return finished

    def _match_stops(self, token: int, step: int, batch_size: int, finished: bool) -> bool:
        """Passes the token through the stop matcher: releases the tokens that can no longer start a stop
        string; returns whether the generation is finished (a stop string, or `finished` already)."""
        vocabulary = self._vocabulary
        text = vocabulary[token] if token < len(vocabulary) else ""
        matcher = self._matcher
        released = matcher.push(token, text)
        finished = finished or matcher.stopped
        if finished and not matcher.stopped:
            released += matcher.flush()
        self._events.extend(GeneratedToken(t, piece, step, batch_size) for t, piece in released)
        if finished:
            self.finish_reason = "stop" if matcher.stopped else "length"
        return finished

    def take(self) -> list[GeneratedToken]:
        """The tokens released since the last call."""
        events, self._events = self._events, []
        if self._made:
            made, self._made = self._made, []
            vocabulary, known = self._vocabulary, len(self._vocabulary)
            events.extend(
                map(
                    _new_event,
                    [(token, vocabulary[token] if token < known else "", step, size, "") for token, step, size in made],
                )
            )
        self._taken_any = self._taken_any or bool(events)
        return events


async def generate(
    scheduler: Scheduler,
    session: Session,
    prompt: np.ndarray,
    params: GenerateParams,
    vocabulary: Sequence[str],
    expected_step: int | None = None,
) -> AsyncIterator[list[GeneratedToken]]:
    """Feeds `prompt` and yields the generated tokens in chunks, as they become ready.

    Each chunk holds the tokens made since the previous one (one or more: under load
    several accumulate while the previous chunk is being sent). The last event of the
    last chunk has a finish reason and token -1. With `expected_step`, the generation
    starts only if the session is at that step (a generation is never replayed: a
    client that lost one reads the step counter). Closing this iterator early stops
    the generation after its current step.
    """
    generation = Generation(params, vocabulary, scheduler.loop)
    running = asyncio.ensure_future(scheduler.generate(session, prompt, generation, expected_step))
    running.add_done_callback(lambda _: generation.changed.set())
    try:
        while True:
            await generation.changed.wait()
            events = generation.take()
            if running.done():
                final = running.result()  # raises the generation's error, if any
                events.append(GeneratedToken(-1, "", final.step, final.batch_size, generation.finish_reason))
                yield events
                return
            if events:
                yield events
    finally:
        if not running.done():
            running.cancel()

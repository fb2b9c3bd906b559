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
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np

from lstmserve.server.sampling import SamplingParams, sampler_for
from lstmserve.server.sessions import Session
from lstmserve.server.stops import StopMatcher
from lstmserve.server.token_log import RESPONSES_PER_ROUND, TokenLog

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
# token than GeneratedToken(...) when a chunk is read token by token.
_new_event = functools.partial(tuple.__new__, GeneratedToken)


class TokenChunk(Sequence[GeneratedToken]):
    """The tokens a generation made since its previous chunk, as columns: `tokens`, `texts`, `steps` and
    `batch_sizes`, one list each, and in the generation's last chunk its `finish` event (token -1, the finish
    reason, the session's last step and the size of its batch).

    Read as a sequence, it gives a GeneratedToken per token, then the finish event if there is one. Columns, not
    an object per token: with 4,096 sessions generating, the tokens that streams held as objects were most of what
    Python's garbage collector walked (`scripts/gc_cost.py --objects --model models/tiny/model.onnx --sessions 4096`).
    """

    __slots__ = ("tokens", "texts", "steps", "batch_sizes", "finish")

    def __init__(self, tokens: list[int], texts: list[str], steps: list[int], batch_sizes: list[int]) -> None:
        self.tokens, self.texts, self.steps, self.batch_sizes = tokens, texts, steps, batch_sizes
        self.finish: GeneratedToken | None = None

    @property
    def finish_reason(self) -> str:
        """Why the generation ended, in its last chunk; "" before."""
        return self.finish.finish_reason if self.finish is not None else ""

    def __len__(self) -> int:
        return len(self.tokens) + (self.finish is not None)

    def __iter__(self) -> Iterator[GeneratedToken]:
        yield from map(_new_event, zip(self.tokens, self.texts, self.steps, self.batch_sizes, repeat("")))
        if self.finish is not None:
            yield self.finish

    @overload
    def __getitem__(self, index: int) -> GeneratedToken: ...

    @overload
    def __getitem__(self, index: slice) -> list[GeneratedToken]: ...

    def __getitem__(self, index: int | slice) -> GeneratedToken | list[GeneratedToken]:
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        made = len(self.tokens)
        position = index + len(self) if index < 0 else index
        if position == made and self.finish is not None:
            return self.finish
        if not 0 <= position < made:
            raise IndexError(f"chunk index {index} out of range for {len(self)} events")
        return GeneratedToken(
            self.tokens[position], self.texts[position], self.steps[position], self.batch_sizes[position]
        )


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

    The batcher attaches it to its token log once its prompt has run (`attach`). A generation without stop
    strings keeps its tokens and counters there, in rows indexed by its session's state slot, which the
    batching loop updates for a whole batch of generations at once (`Batcher._record_tokens`). A
    generation with stop strings passes each token through its stop matcher instead (`consumed_token`). The
    streaming coroutine calls `take`.
    """

    def __init__(
        self, params: GenerateParams, vocabulary: Sequence[str], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.max_tokens = params.max_tokens
        self._coalesce = params.coalesce
        self.sampler = sampler_for(params.sampling)
        self.fed: int | None = None  # the generated token the queued step feeds (None: the prompt)
        self.finish_reason = ""
        # Only with stop strings: thousands of generations at once each keep as few objects as they can.
        # An empty stop string stops nothing (StopMatcher drops it).
        self._matcher = StopMatcher(params.stop) if any(params.stop) else None
        self._vocabulary = vocabulary
        self._count = 0  # tokens made (with stop strings; without, the token log counts them)
        self._events: list[tuple[int, str, int, int]] = []  # (token, text, step, batch size) its stop matcher released
        self._kept: list[tuple[int, int, int]] = []  # (token, step, batch size) moved out of the token log
        self._taken_any = False
        self._log: TokenLog | None = None
        self._slot = 0
        self.owns_log_row = False  # whether its tokens are in the batcher's token log, in its slot's row
        self._request: asyncio.Future[Any] | None = None
        self.changed = Wakeup(loop)  # set when tokens are ready or the generation ended

    @property
    def uses_log(self) -> bool:
        """Whether the generation keeps its tokens in a token log (it has no stop strings)."""
        return self._matcher is None

    def attach(self, log: TokenLog, slot: int, request: asyncio.Future[Any]) -> None:
        """Once its prompt has run (`request` is the future that answers it): keeps the generation's tokens and
        counters in `log`'s row `slot` (its session's state slot), where the batching loop records them for a whole
        batch at once. The row's previous owner, an ended generation of the slot whose stream has not taken all its
        tokens yet, keeps them in a list of its own. If that generation's request is still open (a second generation
        was queued on the session while it ran), this one keeps its tokens in a log of its own and has them recorded
        one at a time (`consumed_token`)."""
        self._request = request
        if not self.uses_log:  # its stop matcher keeps its tokens
            return
        previous = log.owner(slot)
        if previous is not None and previous is not self and previous.request_open:
            log, slot = TokenLog(log.width), 0
        else:
            if previous is not None and previous is not self:
                previous.detach()
            self.owns_log_row = True
        log.claim(slot, self, self.max_tokens, coalesce=self._coalesce)
        self._log, self._slot = log, slot

    def request_done(self, _: asyncio.Future[Any]) -> None:
        """Its request was answered, failed or cancelled: wakes the stream (a future's done callback)."""
        self.changed.set()

    @property
    def request_open(self) -> bool:
        """Whether its request is still unanswered (not answered, failed or cancelled): while it is, the next
        generation of its slot may not take its token log row."""
        return self._request is not None and not self._request.done()

    def abandon(self) -> None:
        """Its stream went away before the end: the token log forgets it and the tokens it still holds (a last
        step still computing may write to the row, which nobody owns then; the next owner starts it afresh)."""
        if self._log is not None:
            self._log.release(self._slot, self)
        self._log, self._kept, self.owns_log_row = None, [], False

    def detach(self) -> None:
        """Leaves the token log, moving the tokens not taken yet out of it first: called once the generation's
        stream is done with it, or when its row is wanted for the slot's next generation."""
        log, slot = self._log, self._slot
        if log is None:
            return
        if log.made[slot] > log.taken[slot]:
            self.keep_backlog()
        log.release(slot, self)
        self._log = None
        self.owns_log_row = False

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

        The batching loop calls it for one row at a time: for generations with stop strings, and for steps that
        went through the session's queue. The tokens of a batch of carried generations without stop strings
        are recorded for all rows at once instead (`Batcher._record_tokens`).
        """
        matcher = self._matcher
        if matcher is not None:
            self._count += 1
            finished = self._match_stops(matcher, token, step, batch_size, self._count >= self.max_tokens)
            held = len(self._events)
            if held and (not self._coalesce or not self._taken_any or held * RESPONSES_PER_ROUND >= generating):
                self.changed.set()
            return finished
        log, slot = self._attached()
        if log.made[slot] - log.taken[slot] >= log.width:
            self.keep_backlog()
        log.record_one(slot, token, step, batch_size)
        finished = bool(log.made[slot] >= self.max_tokens)
        if finished:
            self.finish_reason = "length"
        if log.due_one(slot, generating):
            self.changed.set()
        return finished

    def _attached(self) -> tuple[TokenLog, int]:
        """The token log and row the generation keeps its tokens in (a log of its own if it has none: it was never
        attached, or left the batcher's log and still gets a step)."""
        if self._log is None:
            self._log, self._slot = TokenLog(), 0
            self._log.claim(0, self, self.max_tokens, coalesce=self._coalesce)
        return self._log, self._slot

    def keep_backlog(self) -> None:
        """Moves the tokens made and not taken out of the token log, into a list of the generation's own (before
        the log's row fills up)."""
        log, slot = self._attached()
        self._kept.extend(zip(*log.take(slot)))

    def _match_stops(self, matcher: StopMatcher, token: int, step: int, batch_size: int, finished: bool) -> bool:
        """Passes the token through the stop matcher: releases the tokens that can no longer start a stop
        string; returns whether the generation is finished (a stop string, or `finished` already)."""
        vocabulary = self._vocabulary
        text = vocabulary[token] if token < len(vocabulary) else ""
        released = matcher.push(token, text)
        finished = finished or matcher.stopped
        if finished and not matcher.stopped:
            released += matcher.flush()
        self._events.extend((t, piece, step, batch_size) for t, piece in released)
        if finished:
            self.finish_reason = "stop" if matcher.stopped else "length"
        return finished

    def take(self) -> TokenChunk:
        """The tokens released since the last call."""
        if self._matcher is not None:  # its matcher released its tokens, texts included
            events, self._events = self._events, []
            tokens, texts, steps, sizes = (list(column) for column in zip(*events)) if events else ([], [], [], [])
            chunk = TokenChunk(tokens, texts, steps, sizes)
        else:
            chunk = self._take_logged()
        self._taken_any = self._taken_any or bool(chunk.tokens)
        return chunk

    def _take_logged(self) -> TokenChunk:
        """The tokens recorded since the last call: those moved out of the token log first, then its row's."""
        log = self._log
        tokens, steps, sizes = log.take(self._slot) if log is not None else ([], [], [])
        if self._kept:
            kept, self._kept = self._kept, []
            kept_tokens, kept_steps, kept_sizes = map(list, zip(*kept))
            tokens, steps, sizes = kept_tokens + tokens, kept_steps + steps, kept_sizes + sizes
        vocabulary, known = self._vocabulary, len(self._vocabulary)
        return TokenChunk(tokens, [vocabulary[token] if token < known else "" for token in tokens], steps, sizes)


async def generate(
    scheduler: Scheduler,
    session: Session,
    prompt: np.ndarray,
    params: GenerateParams,
    vocabulary: Sequence[str],
    expected_step: int | None = None,
) -> AsyncGenerator[TokenChunk, None]:
    """Feeds `prompt` and yields the generated tokens in chunks, as they become ready.

    Each chunk holds the tokens made since the previous one (one or more: under load
    several accumulate while the previous chunk is being sent). The last event of the
    last chunk has a finish reason and token -1. With `expected_step`, the generation
    starts only if the session is at that step (a generation is never replayed: a
    client that lost one reads the step counter). Closing this iterator early stops
    the generation after its current step.
    """
    generation = Generation(params, vocabulary, scheduler.loop)
    running = scheduler.start_generation(session, prompt, generation, expected_step)
    running.add_done_callback(generation.request_done)
    try:
        while True:
            await generation.changed.wait()
            chunk = generation.take()
            if running.done():
                final = running.result()  # raises the generation's error, if any
                chunk.finish = GeneratedToken(-1, "", final.step, final.batch_size, generation.finish_reason)
                yield chunk
                return
            if chunk.tokens:
                yield chunk
    finally:
        if not running.done():
            scheduler.stop_generation(running)
            generation.abandon()
        else:
            if not running.cancelled():
                running.exception()  # read, or asyncio logs an error that the client left before reading
            generation.detach()

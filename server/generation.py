"""Server-side generation: feed the prompt, then sample and feed one token at a time.

Each generated token is one more step request to the scheduler, so generating
sessions are batched with every other session. The session consumes the prompt
and every generated token (including a stop string's tokens), so a later step
continues from the end of the generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np

from lstmserve.server.sampling import Sampler, SamplingParams
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.sessions import Session


@dataclass(frozen=True)
class GenerateParams:
    """A generation request: how many tokens at most, how to sample, where to stop."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token and its text; `finish_reason` is set on the last event only."""

    token: int
    text: str
    step: int
    batch_size: int
    finish_reason: str = ""


class StopMatcher:
    """Holds back text that could be the start of a stop string, and finds a stop string.

    `push` takes a token's text and returns the text pieces that are now safe to
    emit; `stopped` turns true when the generated text contains a stop string,
    and the text before it has then been released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held: list[tuple[int, str]] = []

    def push(self, token: int, text: str) -> list[tuple[int, str]]:
        """Adds a token; returns the (token, text) pairs that can be emitted now."""
        self._held.append((token, text))
        held_text = "".join(t for _, t in self._held)
        cut = min((i for i in (held_text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        keep = max((_overlap(held_text, s) for s in self.stops), default=0)
        return self._release(len(held_text) - keep)

    def flush(self) -> list[tuple[int, str]]:
        """Releases everything still held (when generation ends without a stop)."""
        released, self._held = self._held, []
        return released

    def _release(self, chars: int) -> list[tuple[int, str]]:
        released: list[tuple[int, str]] = []
        while self._held and chars > 0:
            token, text = self._held[0]
            if len(text) > chars:
                if self.stopped:  # a token that straddles the stop string: emit its part before it
                    released.append((token, text[:chars]))
                    self._held.pop(0)
                break
            released.append(self._held.pop(0))
            chars -= len(text)
        if self.stopped:
            self._held = []
        return released


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


async def generate(
    scheduler: Scheduler,
    session: Session,
    prompt: np.ndarray,
    params: GenerateParams,
    vocabulary: Sequence[str],
    expected_step: int | None = None,
) -> AsyncIterator[GeneratedToken]:
    """Feeds `prompt` and yields up to `params.max_tokens` generated tokens, the last with a finish reason.

    With `expected_step`, the generation starts only if the session is at that step
    (a generation is never replayed: a client that lost one reads the step counter).
    """
    sampler = Sampler(params.sampling)
    matcher = StopMatcher(params.stop)
    result = await scheduler.step(session, prompt, expected_step, replay=False)
    for count in range(1, params.max_tokens + 1):
        token = sampler.sample(result.logits[-1])
        result = await scheduler.step(session, np.array([token], dtype=prompt.dtype))
        text = vocabulary[token] if token < len(vocabulary) else ""
        released = matcher.push(token, text)
        last = matcher.stopped or count == params.max_tokens
        if last and not matcher.stopped:
            released += matcher.flush()
        for token_out, text_out in released:
            yield GeneratedToken(token_out, text_out, result.step, result.batch_size)
        if last:
            yield GeneratedToken(-1, "", result.step, result.batch_size, "stop" if matcher.stopped else "length")
            return

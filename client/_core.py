"""The client's exactly-once state machine, without I/O (sans-I/O, as h11 and httpx do it).

`Client` (`_sync`) and `AsyncClient` (`_async`) are thin shells over these classes: a shell
opens streams, sends, receives and sleeps; the core decides what each request carries, what a
response or an error means, whether to resend, and what to raise. Nothing here touches a
socket, a thread or an event loop, so tests drive it by feeding it responses and failures.

- `Attempts`: a retry budget (the delay before each attempt, when to give up).
- `UnaryCall`: one idempotent unary call: retried on UNAVAILABLE, else its public error.
- `SessionState`: one session's id, step counter, open/closed state and live generation.
- `StepExchange`: one step's attempts; resent with the same `expected_step` after a broken stream.
- `GenerationState`: one generation's tokens, its end, and how a broken stream ends it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TypeAlias

import grpc
import numpy as np

from lstmserve.client import _wire
from lstmserve.client._errors import LstmServeError, StepMismatch, from_rpc_error
from lstmserve.client._types import (
    Completion,
    GeneratedToken,
    ModelInfo,
    RetryPolicy,
    SessionInfo,
    as_token_list,
)
from lstmserve.client._wire import StreamFailure
from lstmserve.v1 import lstmserve_pb2 as pb

Tokens: TypeAlias = int | Sequence[int] | np.ndarray | str
"""What a step or a prompt accepts: a token id, a sequence of ids, or text in the model's vocabulary."""


# ---- requests --------------------------------------------------------------------------------
def require_one_input(tokens: object, features: object) -> None:
    """ValueError unless exactly one of tokens and features is given."""
    if (tokens is None) == (features is None):
        raise ValueError("pass exactly one of tokens or features")


def token_ids(tokens: Tokens, info: ModelInfo | None) -> list[int]:
    """Token ids for `tokens`; text is encoded with `info`'s vocabulary (the shell fetches it for text)."""
    if isinstance(tokens, str):
        if info is None:
            raise ValueError("text needs the model's vocabulary")
        ids = info.vocabulary.encode(tokens)
        if not ids:
            raise ValueError("the text is empty: a step needs at least one token")
        return ids
    return as_token_list(tokens)


def close_on_exit(resume: str | None, requested: bool | None) -> bool:
    """Whether leaving `with` closes a session: by default a new one yes, a resumed one no."""
    return requested if requested is not None else resume is None


def already_created(error: LstmServeError) -> bool:
    """Whether a create (or restore) failed only because an earlier attempt of it created the session
    (its answer was lost): then that session is the one, and the shell reads it back instead."""
    return error.code == grpc.StatusCode.ALREADY_EXISTS


# ---- retries ---------------------------------------------------------------------------------
class Attempts:
    """A retry budget: the delay before each attempt and when to stop.

    Args:
        retry: the policy (attempts in all, backoff).
    """

    def __init__(self, retry: RetryPolicy) -> None:
        self._retry = retry
        self.made = 0
        self._stopped = False

    def next(self) -> float | None:
        """Seconds to wait before the next attempt (0 before the first); None when none is left."""
        if self._stopped or self.made >= self._retry.max_attempts:
            return None
        delay = self._retry.delay(self.made) if self.made else 0.0
        self.made += 1
        return delay

    def stop(self) -> None:
        """Makes no further attempt (the last failure is not worth retrying)."""
        self._stopped = True


class UnaryCall:
    """One idempotent unary call: retried on UNAVAILABLE within the budget, else its public error.

    Args:
        retry: the retry policy.
    """

    def __init__(self, retry: RetryPolicy) -> None:
        self._attempts = Attempts(retry)
        self._error: LstmServeError | None = None

    def next_attempt(self) -> float | None:
        """Seconds to wait before calling (again); None: give up and raise `error()`."""
        return self._attempts.next()

    def failed(self, error: grpc.RpcError) -> None:
        """Records a failed attempt."""
        self._error = from_rpc_error(error)
        if self._error.code not in _wire.UNARY_RETRY_CODES:
            self._attempts.stop()

    def error(self) -> LstmServeError:
        """The exception to raise after the last attempt."""
        if self._error is None:
            raise RuntimeError("no attempt of this call has failed")
        return self._error


# ---- sessions --------------------------------------------------------------------------------
class SessionState:
    """One session as the client knows it.

    `step` is None when the counter is unknown (after an interrupted or ambiguous call); the
    shell reads it back from the server (`needs_resync`) before the next step.

    Args:
        session_id: the server's id; None until an asyncio session is opened.
        step: the step counter the session is at.
        timeout: the client's timeout, named in a DeadlineExceeded message.
    """

    def __init__(self, session_id: str | None, step: int | None, timeout: float | None) -> None:
        self.session_id = session_id
        self.step = step
        self.timeout = timeout
        self.closed = False
        self.generation: GenerationState | None = None  # started and not yet finished

    @property
    def id(self) -> str:
        """The session id; RuntimeError before the session is open."""
        if self.session_id is None:
            raise RuntimeError("the session is not open yet: `await` it or use `async with`")
        return self.session_id

    def opened(self, info: SessionInfo) -> None:
        """The server created (or found) the session."""
        self.session_id, self.step = info.id, info.step

    def check_open(self) -> None:
        """RuntimeError once `close()` was called."""
        if self.closed:
            raise RuntimeError(f"session {self.session_id!r} is closed")

    def needs_resync(self, resync: bool = True) -> bool:
        """Whether the step counter must be read back from the server before the next call."""
        return resync and self.step is None

    def begin_step(self, request: pb.StepRequest, retry: RetryPolicy) -> StepExchange:
        """The exchange for a one-response step (the session is settled: no live generation, step known)."""
        return StepExchange(self, self._stamp(request), retry)

    def begin_generation(self, generation: GenerationState) -> pb.StepRequest:
        """Marks `generation` started and live; returns its request to send. The step counter is
        unknown until the generation finishes."""
        request = self._stamp(generation.request)
        self.step = None
        generation.started = True
        self.generation = generation
        return request

    def begin_close(self) -> bool:
        """Marks the session closed; whether the server session must be closed too (not when it was
        already closed here or never opened)."""
        if self.closed:
            return False
        self.closed = True
        if self.session_id is None:
            return False
        self.abandon_generation()
        return True

    def detach(self) -> None:
        """The stream is being dropped but the server session kept: a live generation is abandoned,
        and the counter it was moving becomes unknown."""
        if self.generation is not None:
            self.abandon_generation()
            self.step = None

    def abandon_generation(self) -> None:
        """Forgets the live generation (its stream is being dropped)."""
        generation = self.generation
        if generation is not None:
            generation.done = True
            generation.superseded = generation.started
            self.generation = None

    def _stamp(self, request: pb.StepRequest) -> pb.StepRequest:
        if self.step is None:
            raise RuntimeError("the session's step counter is unknown: settle the session first")
        request.session_id = self.id
        request.expected_step = self.step
        return request


class StepExchange:
    """One step's attempts. The request carries `expected_step`, so resending it after a broken
    stream is safe: the server applies it once and answers a repeat from its stored copy.

    Args:
        session: the session it steps.
        request: the stamped request (session id and expected_step set).
        retry: the retry policy.
    """

    def __init__(self, session: SessionState, request: pb.StepRequest, retry: RetryPolicy) -> None:
        self.session = session
        self.request = request
        self._attempts = Attempts(retry)
        self._failure: StreamFailure | None = None

    def next_attempt(self) -> float | None:
        """Seconds to wait before (re)sending `request` on a fresh stream; None: raise `error()`."""
        return self._attempts.next()

    def succeeded(self, response: pb.StepResponse) -> pb.StepResponse:
        """The response arrived: the session is at its step."""
        self.session.step = int(response.step)
        return response

    def failed(self, failure: StreamFailure) -> None:
        """The stream broke (the shell drops it); resent if the failure is transient."""
        self._failure = failure
        if not failure.retryable:
            self._attempts.stop()

    def interrupted(self) -> None:
        """The caller was interrupted (KeyboardInterrupt, task cancelled): a response may be pending."""
        self.session.step = None

    def error(self) -> LstmServeError:
        """The exception to raise after the last attempt; the counter becomes unknown when the
        request may or may not have been applied."""
        failure = self._failure
        if failure is None:
            raise RuntimeError("no attempt of this step has failed")
        error = failure.error(self.session.timeout)
        if failure.timed_out or failure.retryable or isinstance(error, StepMismatch):
            self.session.step = None
        return error


# ---- generations -----------------------------------------------------------------------------
class GenerationState:
    """One generation's progress: received tokens (some not yet handed out), and its end.

    A generation is not resent after its stream breaks (the server does not make generation
    exactly-once): the failure ends it, whether the request was being sent or its tokens read,
    and the session's counter stays unknown until read back.

    Args:
        session: the session it runs on.
        request: its StepRequest (stamped when it starts).
    """

    def __init__(self, session: SessionState, request: pb.StepRequest) -> None:
        self.session = session
        self.request = request
        self.started = False
        self.done = False
        self.superseded = False  # ended early by another call on the session (drained or abandoned)
        self.tokens: list[GeneratedToken] = []
        self.unread: deque[GeneratedToken] = deque()  # received in a multi-token response, not yet returned
        self.finish_reason: str | None = None
        self.step = -1

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(item.text for item in self.tokens)

    def buffered(self) -> GeneratedToken | None:
        """The next token already received; RuntimeError once another call ended the generation."""
        if self.superseded:
            raise RuntimeError("this generation was ended early by another call on its session")
        return self.unread.popleft() if self.unread else None

    def received(self, response: pb.StepResponse) -> GeneratedToken | None:
        """Takes a response; returns the next token, or None after the final response carried none."""
        items = _wire.generated_tokens(response)
        self.tokens.extend(items)
        self.unread.extend(items)
        if response.finished:
            self.done = True
            self.finish_reason = response.finish_reason
            self.step = int(response.step)
            self.session.step = self.step
            self.session.generation = None
        return self.unread.popleft() if self.unread else None

    def broken(self, error: BaseException) -> BaseException:
        """Sending or reading failed (the shell drops the stream): the generation ends, and this
        returns what to raise (the public error for a broken stream, else `error` itself)."""
        self.done = True
        if self.session.generation is self:
            self.session.generation = None
        if isinstance(error, StreamFailure):
            return error.error(self.session.timeout)
        return error

    def supersede(self) -> bool:
        """Another call needs the session: whether the rest must be read (and discarded) first."""
        if not self.started:
            self.done = True
            if self.session.generation is self:
                self.session.generation = None
            return False
        self.superseded = True
        return True

    def completion(self) -> Completion:
        """The finished generation as a Completion."""
        if self.finish_reason is None:
            raise RuntimeError("the generation has not finished")
        return Completion(
            text=self.text, tokens=tuple(i.token for i in self.tokens), finish_reason=self.finish_reason, step=self.step
        )

"""The client's exactly-once state machine, without I/O (sans-I/O, as h11 and httpx do it).

`Client` (`_sync`) and `AsyncClient` (`_async`) are thin shells over these classes: a shell
opens streams, sends, receives and sleeps; the core decides what each request carries, what a
response or an error means, whether to resend, and what to raise. Nothing here touches a
socket, a thread or an event loop, so tests drive it by feeding it responses and failures.

- `Attempts`: a retry budget (the delay before each attempt, when to give up).
- `UnaryCall`: one idempotent unary call: retried on UNAVAILABLE, else its public error.
- `SessionState`: one session's id, step counter, open/closed state and live generation.
- `StepExchange`: one step's attempts; resent with the same `expected_step` after a broken stream.
- `MultiStepExchange`: one `StepSessions` call's attempts: one step of each of many sessions, each
  entry resent with its same `expected_step` until it is answered, each answer or refusal its own outcome.
- `GenerationState`: one generation's tokens, its end, and how a broken stream ends it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import grpc
import numpy as np

from lstmserve.client import _wire
from lstmserve.client._errors import LstmServeError, StepMismatch, error_for, from_rpc_error
from lstmserve.client._types import (
    Completion,
    GeneratedToken,
    ModelInfo,
    OutputKind,
    RetryPolicy,
    SessionInfo,
    StepOutput,
    as_token_list,
)
from lstmserve.client._wire import StreamFailure
from lstmserve.v1 import lstmserve_pb2 as pb

Stampable = TypeVar("Stampable", pb.StepRequest, pb.SessionStep)
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

    def give_back(self) -> None:
        """The last attempt does not count: it was refused for its form, with nothing done, and is made again."""
        self.made -= 1


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

    def _stamp(self, request: Stampable) -> Stampable:
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


# ---- many sessions in one call ---------------------------------------------------------------
@dataclass(eq=False)
class MultiStepEntry:
    """One session's entry of a `StepSessions` call.

    Args:
        session: the session it steps.
        request: its SessionStep (stamped with the session id and `expected_step` before the first attempt).
        outcome: its answer or refusal; None while it is still to be sent (again).
        last_error: why the last attempt did not answer it (its outcome if no attempt is left).
        in_doubt: an attempt may have applied it without its answer arriving.
    """

    session: SessionState
    request: pb.SessionStep
    outcome: pb.StepResponse | StepOutput | LstmServeError | None = None  # StepOutput: answered in columns
    last_error: LstmServeError | None = None
    in_doubt: bool = False


class MultiStepExchange:
    """One `StepSessions` call: one step of each of many sessions, each entry answered on its own.

    Every entry carries its session's `expected_step`, stamped once, so resending it is safe: the
    server applies it once and answers a repeat from its stored copy. Each attempt sends the entries
    not yet answered. Resent (within the retry budget): every entry, after a failure of the whole call
    that a step's stream would be resent after (UNAVAILABLE, CANCELLED, INTERNAL); an entry refused
    with one of those codes (its session moving between replicas, a drain, a failed batch). Final:
    an entry's response, which sets its session's counter; any other refusal of an entry, which keeps
    the counter, except a StepMismatch, or an entry an earlier attempt may have applied (the counter
    becomes unknown: the shell reads it back before the session's next call); any other failure of
    the whole call, the client's own timeout included (not resent, as a step is not), which becomes
    the outcome of every entry not yet answered.

    Refused before anything is sent: a closed session, one with a generation in progress (not
    drained, unlike `Session.step`), a session given twice.

    Args:
        sessions: the sessions, in the caller's order.
        requests: each session's SessionStep (input and output fields), in the same order.
        retry: the retry policy (attempts of the whole call, the first included).
    """

    def __init__(
        self, sessions: Sequence[SessionState], requests: Sequence[pb.SessionStep], retry: RetryPolicy
    ) -> None:
        if len(sessions) != len(requests):
            raise ValueError(f"{len(sessions)} sessions but {len(requests)} requests: one request per session")
        first: dict[str, int] = {}
        for index, session in enumerate(sessions):
            session.check_open()
            if session.generation is not None:
                raise RuntimeError(
                    f"session {session.id!r} has a generation in progress: read it to its end before "
                    "stepping the session with step_sessions (which does not drain it)"
                )
            earlier = first.setdefault(session.id, index)
            if earlier != index:
                raise ValueError(
                    f"session {session.id!r} is given twice (entries {earlier} and {index}): "
                    "one call steps each session at most once"
                )
        self.entries = [MultiStepEntry(session, request) for session, request in zip(sessions, requests, strict=True)]
        self._attempts = Attempts(retry)
        self._stamped = False
        self._sent: list[MultiStepEntry] = []
        self._sent_columns = False  # the last request went in columns
        self._steps_only = False  # the server does not know the columns form (older than it): steps from now on

    def pending(self) -> list[MultiStepEntry]:
        """The entries not yet answered."""
        return [entry for entry in self.entries if entry.outcome is None]

    def needs_resync(self) -> list[SessionState]:
        """The sessions whose step counter the shell must read back from the server before the first attempt."""
        return [entry.session for entry in self.pending() if entry.session.needs_resync()]

    def resync_failed(self, session: SessionState, error: LstmServeError) -> None:
        """Reading `session`'s counter back failed: that error is its entry's outcome, and it is not sent."""
        for entry in self.entries:
            if entry.session is session:
                entry.outcome = error

    def next_attempt(self) -> float | None:
        """Seconds to wait before sending `request()` (again); None: the call is over, read `outcomes()`."""
        pending = self.pending()
        if not pending:
            return None
        if not self._stamped:  # once: a resend carries the expected_step of the first send
            for entry in pending:
                entry.session._stamp(entry.request)
            self._stamped = True
        return self._attempts.next()

    def request(self) -> pb.StepSessionsRequest:
        """The request to send: every entry not yet answered, as first stamped; in columns (SessionColumns)
        when the entries fit them (one position each, one output kind), else a SessionStep each."""
        self._sent = self.pending()
        steps = [entry.request for entry in self._sent]
        columns = None if self._steps_only else _wire.session_columns(steps)
        self._sent_columns = columns is not None
        if columns is not None:
            return pb.StepSessionsRequest(columns=columns)
        return pb.StepSessionsRequest(steps=steps)

    def answered(self, response: pb.StepSessionsResponse) -> None:
        """The call's response: one result per entry sent, in order (as results, or in columns)."""
        if response.HasField("columns"):
            self._answered_in_columns(response.columns)
            return
        results = response.results
        if len(results) != len(self._sent):
            message = f"the server answered {len(results)} results for {len(self._sent)} entries"
            self._call_failed(LstmServeError(grpc.StatusCode.INTERNAL, message), resend=False, in_doubt=True)
            return
        for entry, result in zip(self._sent, results, strict=True):
            kind = result.WhichOneof("outcome")
            if kind == "response":
                entry.outcome = result.response
                entry.session.step = int(result.response.step)
            elif kind == "error":
                self._refused(entry, _wire.step_error(result.error))
            else:
                entry.in_doubt = True
                self._refused(entry, LstmServeError(grpc.StatusCode.UNKNOWN, "the server's result has no outcome"))

    def _answered_in_columns(self, result: pb.SessionColumnsResult) -> None:
        """The columns answer to the entries sent: row i for the i-th entry sent."""
        if len(result.steps) != len(self._sent) or len(result.batch_sizes) != len(self._sent):
            message = f"the server answered {len(result.steps)} rows for {len(self._sent)} entries"
            self._call_failed(LstmServeError(grpc.StatusCode.INTERNAL, message), resend=False, in_doubt=True)
            return
        refusals = {error.index: error for error in result.errors}
        try:
            if any(index >= len(self._sent) for index in refusals):
                raise ValueError(f"a refusal names row {max(refusals)} of {len(self._sent)}")
            outputs = _wire.column_outputs(result, self._sent[0].request.output)
        except ValueError as error:  # a malformed answer (a faulty server or proxy): the rows may have been applied
            message = f"the server's columns answer is malformed: {error}"
            self._call_failed(LstmServeError(grpc.StatusCode.INTERNAL, message), resend=False, in_doubt=True)
            return
        for row, (entry, output) in enumerate(zip(self._sent, outputs, strict=True)):
            refusal = refusals.get(row)
            if refusal is not None:
                self._refused(entry, _wire.step_error(refusal))
            else:
                entry.outcome = output
                entry.session.step = output.step

    def failed(self, error: grpc.RpcError) -> None:
        """The whole call failed: resent if transient, else its error is the outcome of every entry not yet answered."""
        public = from_rpc_error(error)
        if self._sent_columns and _wire.columns_not_understood(public):
            self._steps_only = True  # nothing was applied: the same entries go again, as steps
            self._attempts.give_back()
            return
        resend = public.code in _wire.STREAM_RETRY_CODES
        self._call_failed(public, resend=resend, in_doubt=resend or public.code == grpc.StatusCode.DEADLINE_EXCEEDED)

    def interrupted(self) -> None:
        """The caller was interrupted (KeyboardInterrupt, task cancelled): the entries sent may have been applied."""
        for entry in self._sent:
            if entry.outcome is None:
                entry.session.step = None

    def outcomes(self, output: OutputKind) -> list[StepOutput | LstmServeError]:
        """Each entry's outcome, in order, once `next_attempt()` said the call is over: its StepOutput
        (of kind `output`), or the public error of its refusal (or of the whole call's failure)."""
        for entry in self.pending():
            if entry.last_error is None:
                raise RuntimeError("the call is not over: an entry has neither an answer nor a failure")
            self._settle(entry, entry.last_error)
        return [
            _wire.step_output(entry.outcome, output) if isinstance(entry.outcome, pb.StepResponse) else entry.outcome
            for entry in self.entries
            if entry.outcome is not None
        ]

    def _refused(self, entry: MultiStepEntry, error: LstmServeError) -> None:
        if error.code in _wire.STREAM_RETRY_CODES:  # resent with the next attempt, if one is left
            entry.in_doubt = True
            entry.last_error = error
        else:
            self._settle(entry, error)

    def _call_failed(self, error: LstmServeError, *, resend: bool, in_doubt: bool) -> None:
        if not resend:
            self._attempts.stop()
        for entry in self._sent:
            entry.last_error = error_for(error.code, error.details)  # each entry its own instance
            entry.in_doubt = entry.in_doubt or in_doubt

    @staticmethod
    def _settle(entry: MultiStepEntry, error: LstmServeError) -> None:
        entry.outcome = error
        if entry.in_doubt or isinstance(error, StepMismatch):
            entry.session.step = None


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

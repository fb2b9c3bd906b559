"""The synchronous client: `Client`, `Session` and `Generation`.

A session's steps travel on one bidirectional `Step` stream, fed from a queue
(sync gRPC reads the request iterator on its own thread). Every step carries
`expected_step`, so when the stream breaks (UNAVAILABLE, CANCELLED, INTERNAL)
the session opens a new stream with its id and resends the same request: the
server either applies it or, if it already had, answers from its stored copy.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from lstmserve.client import _core, _wire
from lstmserve.client._core import Tokens
from lstmserve.client._errors import LstmServeError, SessionNotFound
from lstmserve.client._types import (
    Completion,
    GeneratedToken,
    ModelInfo,
    OutputKind,
    RetryPolicy,
    SessionInfo,
    StepOutput,
    as_features,
)
from lstmserve.client._wire import StreamFailure
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

T = TypeVar("T")
_CLOSE = object()  # ends a stream's request iterator (half-close)


class _Stream:
    """One `Step` call. Requests go through a queue that gRPC's own thread reads."""

    def __init__(self, stub: pb_grpc.LstmServeStub, metadata: tuple[tuple[str, Any], ...]) -> None:
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.call: Any = stub.Step(iter(self._requests.get, _CLOSE), metadata=metadata)

    @property
    def alive(self) -> bool:
        """Whether the call has not ended (a cancelled or failed call is done)."""
        return not self.call.done()

    def send(self, request: pb.StepRequest) -> None:
        """Queues a request for gRPC's sending thread."""
        self._requests.put(request)

    def recv(self, timeout: float | None) -> pb.StepResponse:
        """The next response; StreamFailure when the call ends (or `timeout` passes first)."""
        expired = threading.Event()
        timer = None
        if timeout is not None:

            def expire() -> None:
                expired.set()
                self.call.cancel()

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            return next(self.call)
        except StopIteration:
            raise StreamFailure(grpc.StatusCode.UNAVAILABLE, "the server ended the step stream") from None
        except grpc.RpcError as error:
            raise StreamFailure.from_rpc(error, timed_out=expired.is_set()) from None
        finally:
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        """Ends the call and frees gRPC's sending thread (which waits on the queue)."""
        self._requests.put(_CLOSE)
        self.call.cancel()


class Client:
    """A synchronous client of an lstmserve server; owns its channel (use `with` or call `close()`).

    Methods may be called from several threads at once; each `Session` belongs to
    one thread at a time (its methods are serialized by a lock).

    Retries (bounded by `retry`, with backoff): unary calls (model_info, infer,
    session info, reset and close, resuming a session) are retried on UNAVAILABLE;
    they are idempotent, and close treats NOT_FOUND as done. Creating a session is
    retried on UNAVAILABLE too: such a request almost always never reached the
    server, and in the rare case it did, the unused session expires by the server's
    TTL. A step whose stream breaks (UNAVAILABLE, CANCELLED, INTERNAL) is resent on
    a new stream with the same `expected_step`, so it is applied exactly once (see
    `Session.step`); a generation is not resent (see `Session.generate`). `step_sessions`
    resends its call the same way, each entry with its same `expected_step`.

    Args:
        target: "host:port" of the server.
        timeout: seconds each call (and each step's response) may take; None waits forever.
        credentials: `grpc.ChannelCredentials` for a TLS channel; None uses plaintext.
        metadata: (key, value) pairs sent with every call.
        retry: how transient failures are retried (default `RetryPolicy()`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = _wire.normalize_metadata(metadata)
        options = list(_wire.CHANNEL_OPTIONS)
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.LstmServeStub(self._channel)
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ends every session's stream and closes the channel. Server sessions stay until closed or expired."""
        if self._closed:
            return
        self._closed = True
        with self._sessions_lock:
            sessions = list(self._sessions)
        for session in sessions:
            session._drop_stream()
        self._channel.close()

    def model_info(self) -> ModelInfo:
        """What the server serves (kind, vocabulary, sizes, steppable, provider, limits)."""
        info = _wire.model_info(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))
        self._info = info
        return info

    def infer(self, tokens: Tokens | None = None, *, features: Any = None) -> np.ndarray:
        """Logits float32 [positions, output_size] of a whole sequence from zero state, without a session.

        The only way to run a bidirectional model.
        """
        _core.require_one_input(tokens, features)
        request = pb.InferRequest()
        if tokens is not None:
            request.tokens.extend(self._token_ids(tokens))
        else:
            request.features.CopyFrom(_wire.encode_features(as_features(features)))
        reply: pb.InferResponse = self._unary(self._stub.Infer, request)
        return _wire.decode_logits(reply.logits)

    def session(
        self, resume: str | None = None, *, restore: bytes | None = None, close_on_exit: bool | None = None
    ) -> Session:
        """A new session (zero state), the live session `resume`, or a new session from a snapshot.

        A new session's id is proposed by this client (32 random hex digits), and every call of the
        session carries it in the `lstmserve-session` metadata, so a proxy in front of several
        replicas sends all of them, the creating call included, to the same replica.

        `restore` is a blob from `Session.snapshot()` (on this or another server of the same
        model); the new session has the snapshot's state and step counter and a new id.

        Use it as a context manager: on exit a new session is closed on the server,
        a resumed one only detached (its stream ended) so it can be resumed again,
        unless `close_on_exit` says otherwise.

        Raises:
            SessionNotFound: `resume` is unknown, closed or expired.
            ServerBusy: the server's max_sessions is reached.
            NotSteppable: the model is bidirectional.
        """
        if resume is not None and restore is not None:
            raise ValueError("pass at most one of resume and restore")
        if resume is not None:
            info = self._get_session(resume)
        elif restore is not None:
            info = self._create(self._stub.RestoreSession, pb.RestoreSessionRequest(blob=restore, session_id=_wire.new_session_id()))
        else:
            info = self._create(self._stub.CreateSession, pb.CreateSessionRequest(session_id=_wire.new_session_id()))
        session = Session(self, info.id, info.step, close_on_exit=_core.close_on_exit(resume, close_on_exit))
        with self._sessions_lock:
            self._sessions.add(session)
        return session

    def step_sessions(
        self,
        tokens: Mapping[Session, Tokens] | None = None,
        *,
        features: Mapping[Session, Any] | None = None,
        output: OutputKind = "logits",
        k: int = 5,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[StepOutput | LstmServeError]:
        """One step of each of many sessions of this client, in one `StepSessions` call.

        `client.step_sessions({a: [1, 2], b: "hi"})` feeds each session its own input (tokens, or
        `features={a: rows, ...}` for a feature model); the output options apply to every entry, as
        `Session.step` takes them. The server computes the entries together, and each session's state
        carries on exactly as if it had been stepped alone. When every session gets one token (or one
        feature row) and no seed is set, the call goes in columns (`SessionColumns`: no message per
        session, the cheapest form for a caller stepping many streams in lockstep); else one
        `SessionStep` per session. The outcomes are the same either way.

        Returns one outcome per session, in the mapping's order: its `StepOutput`, or, when the server
        refused that entry (or the whole call failed), the exception `Session.step` would have raised,
        as a value (`SessionNotFound`, `InvalidRequest`, `StepMismatch`, `Unavailable`...): one bad
        entry does not disturb the others, and nothing is raised for it.

        Exactly once: each entry carries its session's expected step counter; a call that failed in
        transit (UNAVAILABLE, CANCELLED, INTERNAL), or an entry refused as moving or draining, is resent
        with the same counters, so an entry already applied is answered from the server's copy. The
        client's own `timeout` is not resent (as for a step): its `DeadlineExceeded` is each unanswered
        entry's outcome, and those sessions re-read their counters before their next call.

        Raises (before anything is sent): ValueError for a bad option, a session of another client, or
        one given twice; RuntimeError for a closed session or one with a generation in progress
        (finish it first: unlike `Session.step`, this does not drain it).
        """
        sessions, requests = self._session_steps(tokens, features, output, k, temperature, top_k, top_p, seed)
        with contextlib.ExitStack() as locks:
            for session in sorted(sessions, key=_lock_order):  # one order for every caller: no deadlock
                locks.enter_context(session._lock)
            exchange = _core.MultiStepExchange([s._core for s in sessions], requests, self.retry)
            for state in exchange.needs_resync():
                try:
                    state.step = self._get_session(state.id).step
                except LstmServeError as error:
                    exchange.resync_failed(state, error)
            while (delay := exchange.next_attempt()) is not None:
                try:
                    if delay:
                        time.sleep(delay)
                    response = self._stub.StepSessions(exchange.request(), timeout=self.timeout, metadata=self._metadata)
                except grpc.RpcError as error:
                    exchange.failed(error)
                    continue
                except BaseException:  # interrupted (KeyboardInterrupt): the entries sent may have been applied
                    exchange.interrupted()
                    raise
                exchange.answered(response)
            return exchange.outcomes(output)

    # ---- internals -------------------------------------------------------
    def _session_steps(
        self,
        tokens: Mapping[Session, Tokens] | None,
        features: Mapping[Session, Any] | None,
        output: OutputKind,
        k: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
    ) -> tuple[list[Session], list[pb.SessionStep]]:
        """The sessions of a `step_sessions` call and each one's SessionStep (not yet stamped)."""
        _core.require_one_input(tokens, features)
        sample = _wire.sampling(temperature, top_k, top_p, seed) if output == "sample" else None
        sessions: list[Session] = []
        requests: list[pb.SessionStep] = []
        for session, value in (tokens or features or {}).items():
            if not isinstance(session, Session) or session._client is not self:
                raise ValueError(f"{session!r} is not a Session of this client: step_sessions steps its own sessions")
            sessions.append(session)
            requests.append(
                _wire.session_step(
                    tokens=self._token_ids(value) if tokens is not None else None,
                    features=as_features(value) if features is not None else None,
                    output=output,
                    k=k,
                    sample=sample,
                )
            )
        return sessions, requests

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        """Calls a unary RPC, retrying UNAVAILABLE."""
        call = _core.UnaryCall(self.retry)
        metadata = _wire.call_metadata(self._metadata, request)
        while (delay := call.next_attempt()) is not None:
            if delay:
                time.sleep(delay)
            try:
                return method(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as error:
                call.failed(error)
        raise call.error()

    def _create(self, method: Callable[..., Any], request: Any) -> SessionInfo:
        """Creates (or restores) a session under the id `request` proposes (see `_core.already_created`)."""
        try:
            return _wire.session_info(self._unary(method, request))
        except LstmServeError as error:
            if not _core.already_created(error):
                raise
            return self._get_session(request.session_id)

    def _get_session(self, session_id: str) -> SessionInfo:
        return _wire.session_info(self._unary(self._stub.GetSession, pb.SessionRef(session_id=session_id)))

    def _token_ids(self, tokens: Tokens) -> list[int]:
        if isinstance(tokens, str) and self._info is None:
            self.model_info()
        return _core.token_ids(tokens, self._info)


def _lock_order(session: Session) -> tuple[str, int]:
    return session.id, id(session)


class Session:
    """One server-side session: its LSTM state carries from step to step. Get one from `Client.session()`.

    Its methods are serialized by a lock; use a session from one thread at a time
    and several sessions for parallelism.

    Args:
        client: the client it belongs to.
        session_id: the server's id.
        step: the step counter the session is at.
        close_on_exit: whether leaving `with` closes the session on the server (else only detaches).
    """

    def __init__(self, client: Client, session_id: str, step: int, *, close_on_exit: bool = True) -> None:
        self._client = client
        self._core = _core.SessionState(session_id, step, client.timeout)
        self.close_on_exit = close_on_exit
        self._stream: _Stream | None = None
        self._generation: Generation | None = None  # the last one started; live while the core says so
        self._lock = threading.RLock()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.close_on_exit:
            self.close()
        else:
            self.detach()

    def __del__(self) -> None:
        try:
            self._drop_stream()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"Session(id={self._core.session_id!r}, step={self._core.step})"

    @property
    def id(self) -> str:
        """The session id; `Client.session(resume=id)` (on any client) reattaches to it."""
        return self._core.id

    @property
    def position(self) -> int | None:
        """The step counter as this client last saw it (None right after an interrupted call)."""
        return self._core.step

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._core.closed

    def step(
        self,
        tokens: Tokens | None = None,
        *,
        features: Any = None,
        output: OutputKind = "logits",
        k: int = 5,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> StepOutput:
        """Feeds tokens (token models) or feature rows (feature models) and returns what `output` asks for.

        Args:
            tokens: a token id, a sequence of ids, or a str encoded with the model's vocabulary.
            features: float32 [positions, input_size] (or one row [input_size]).
            output: "logits" (float32 [positions, output_size]), "topk" (`k` best ids and
                log-probabilities per position), "sample" (one token drawn from the last
                position with temperature/top_k/top_p/seed), or "none" (just the counter).

        Exactly once: the request carries the expected step counter, so a step whose
        stream broke is resent on a new stream without being applied twice.

        Raises:
            InvalidRequest: a bad value (the session is unchanged and stays usable).
            SessionNotFound: the session is closed or expired.
            NotSteppable: the model is bidirectional.
        """
        _core.require_one_input(tokens, features)
        sample = _wire.sampling(temperature, top_k, top_p, seed) if output == "sample" else None
        request = _wire.step_request(
            tokens=self._client._token_ids(tokens) if tokens is not None else None,
            features=as_features(features) if features is not None else None,
            output=output,
            k=k,
            sample=sample,
        )
        with self._lock:
            self._core.check_open()
            self._settle()
            response = self._exchange(self._core.begin_step(request, self._client.retry))
        return _wire.step_output(response, output)

    def generate(
        self,
        prompt: Tokens,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Generation:
        """Feeds `prompt`, then streams up to `max_tokens` tokens generated by the server.

        Returns an iterator of `GeneratedToken`; the request is sent when iteration
        starts. Text matching a `stop` string is not returned. The session consumes
        the prompt and every generated token, so later steps continue from the end.
        Another call on this session before the generation is finished first reads
        (and discards) the rest of it.

        A generation is not resent after its stream breaks (the server does not make
        generation exactly-once): the error is raised and the session re-reads its
        step counter from the server before its next call.
        """
        sample = _wire.sampling(temperature, top_k, top_p, seed)
        request = _wire.generate_request(self._client._token_ids(prompt), max_tokens, sample, stop)
        return Generation(self, request)

    def complete(
        self,
        prompt: Tokens,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Completion:
        """Runs `generate` to the end and returns the whole text, tokens and finish reason."""
        generation = self.generate(
            prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop
        )
        for _ in generation:
            pass
        return generation._state.completion()

    def reset(self) -> SessionInfo:
        """Returns the session to zero state and step 0."""
        with self._lock:
            self._core.check_open()
            self._settle(resync=False)
            reply = self._client._unary(self._client._stub.ResetSession, pb.SessionRef(session_id=self.id))
            info = _wire.session_info(reply)
            self._core.step = info.step
            return info

    def info(self) -> SessionInfo:
        """The session as the server sees it (step counter, idle time, time to expiry)."""
        return self._client._get_session(self.id)

    def snapshot(self) -> bytes:
        """An opaque, versioned, integrity-checked copy of the session's state and step counter.

        `client.session(restore=blob)` recreates the session on any server of the same model.
        """
        with self._lock:
            self._core.check_open()
            self._settle(resync=False)
            reply = self._client._unary(self._client._stub.SnapshotSession, pb.SessionRef(session_id=self.id))
            self._core.step = int(reply.step)
            return bytes(reply.blob)

    def close(self) -> None:
        """Closes the session on the server and frees its state. Idempotent: an expired session is not an error."""
        with self._lock:
            if not self._core.begin_close():
                return
            self._drop_stream()
            try:
                self._client._unary(self._client._stub.CloseSession, pb.SessionRef(session_id=self.id))
            except SessionNotFound:
                pass

    def detach(self) -> None:
        """Ends this object's stream but keeps the server session (resume it later by `id`)."""
        with self._lock:
            self._core.detach()
            self._drop_stream()

    # ---- internals -------------------------------------------------------
    def _ensure_stream(self) -> _Stream:
        if self._stream is None or not self._stream.alive:
            self._drop_stream()
            self._stream = _Stream(self._client._stub, _wire.with_session(self._client._metadata, self.id))
        return self._stream

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _settle(self, *, resync: bool = True) -> None:
        """Finishes an unfinished generation and learns the step counter if it is unknown."""
        generation = self._generation
        if generation is not None and self._core.generation is generation._state:
            try:
                generation._drain()
            except LstmServeError:
                pass  # the step counter is re-read below
        if self._core.needs_resync(resync):
            self._core.step = self._client._get_session(self.id).step

    def _exchange(self, exchange: _core.StepExchange) -> pb.StepResponse:
        """Sends a one-response request; after a transient stream failure resends it on a new stream."""
        while (delay := exchange.next_attempt()) is not None:
            if delay:
                time.sleep(delay)
            stream = self._ensure_stream()
            try:
                stream.send(exchange.request)
                response = stream.recv(self._client.timeout)
            except StreamFailure as failure:
                self._drop_stream()  # the server ended the stream; the next call opens a new one
                exchange.failed(failure)
                continue
            except BaseException:  # interrupted (KeyboardInterrupt, task cancelled): a response may be pending
                self._drop_stream()
                exchange.interrupted()
                raise
            return exchange.succeeded(response)
        raise exchange.error()

    def _start_generation(self, generation: Generation) -> None:
        """Settles the session and sends the generation's request; a failure ends the generation."""
        state = generation._state
        try:
            self._core.check_open()
            self._settle()
        except BaseException as error:
            raise state.broken(error) from None
        request = self._core.begin_generation(state)
        self._generation = generation
        generation._stream = stream = self._ensure_stream()  # a stream found broken is replaced before sending
        try:
            stream.send(request)
        except BaseException as error:  # the request may or may not have left: not resent
            self._drop_stream()
            raise state.broken(error) from None


class Generation(Iterator[GeneratedToken]):
    """The tokens of one `Session.generate` call as they are produced.

    After the last token, `finish_reason` is "length" or "stop" and `step` is the
    session's step counter. `text` is the text so far.
    """

    def __init__(self, session: Session, request: pb.StepRequest) -> None:
        self._session = session
        self._state = _core.GenerationState(session._core, request)
        self._stream: _Stream | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> GeneratedToken:
        with self._session._lock:
            item = self._state.buffered()
            if item is not None:
                return item
            if self._state.done:
                raise StopIteration
            if not self._state.started:
                self._session._start_generation(self)
            item = self._read()
            if item is None:
                raise StopIteration
            return item

    @property
    def finish_reason(self) -> str | None:
        """"length" or "stop" once finished, else None."""
        return self._state.finish_reason

    @property
    def step(self) -> int:
        """The session's step counter after the last token (-1 until finished)."""
        return self._state.step

    @property
    def tokens(self) -> list[GeneratedToken]:
        """The tokens received so far."""
        return list(self._state.tokens)

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    def _read(self) -> GeneratedToken | None:
        """The next token, or None after the final response."""
        assert self._stream is not None
        try:
            response = self._stream.recv(self._session._client.timeout)
        except BaseException as error:  # broken or interrupted: the rest cannot be read in order any more
            self._session._drop_stream()
            raise self._state.broken(error) from None
        return self._state.received(response)

    def _drain(self) -> None:
        """Reads the rest of the generation (another call on the session needs the stream)."""
        if self._state.supersede():
            while not self._state.done:
                self._read()

"""The asyncio client: `AsyncClient`, `AsyncSession` and `AsyncGeneration`.

The same behaviour as the synchronous client (see `_sync`), on `grpc.aio`: a
session's steps travel on one `Step` call (`write` then `read`), every step
carries `expected_step`, and a broken stream is replaced and the step resent.
Both clients are I/O shells over the same state machine (`_core`).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
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


class _AsyncStream:
    """One `Step` call on a grpc.aio channel."""

    def __init__(self, stub: pb_grpc.LstmServeStub, metadata: tuple[tuple[str, Any], ...]) -> None:
        self.call: Any = stub.Step(metadata=metadata)

    @property
    def alive(self) -> bool:
        """Whether the call has not ended."""
        return not self.call.done()

    async def send(self, request: pb.StepRequest) -> None:
        """Writes a request; StreamFailure if the call has ended."""
        try:
            await self.call.write(request)
        except asyncio.CancelledError:
            raise self._cancelled() from None
        except grpc.RpcError as error:
            raise StreamFailure.from_rpc(error) from None
        except asyncio.InvalidStateError:
            raise StreamFailure(grpc.StatusCode.UNAVAILABLE, "the step stream has ended") from None

    async def recv(self, timeout: float | None) -> pb.StepResponse:
        """The next response; StreamFailure when the call ends (or `timeout` passes first)."""
        try:
            response = await asyncio.wait_for(self.call.read(), timeout)
        except TimeoutError:
            self.call.cancel()
            raise StreamFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "timed out", timed_out=True) from None
        except asyncio.CancelledError:
            raise self._cancelled() from None
        except grpc.RpcError as error:
            raise StreamFailure.from_rpc(error) from None
        if response is grpc.aio.EOF:
            raise StreamFailure(grpc.StatusCode.UNAVAILABLE, "the server ended the step stream")
        return response

    def close(self) -> None:
        """Ends the call."""
        self.call.cancel()

    def _cancelled(self) -> BaseException:
        """What a CancelledError from grpc.aio means.

        grpc.aio raises CancelledError for a locally cancelled call: that is a broken
        stream, unless our own task is the one being cancelled.
        """
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return asyncio.CancelledError()
        return StreamFailure(grpc.StatusCode.CANCELLED, "the step stream was cancelled")


class AsyncClient:
    """An asyncio client of an lstmserve server; owns its channel (use `async with` or `await close()`).

    Many sessions may run concurrently on one client, one task each (a session's
    own calls are serialized by a lock). Retries and reattachment as in `Client`.

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
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.LstmServeStub(self._channel)
        self._sessions: weakref.WeakSet[AsyncSession] = weakref.WeakSet()
        self._info: ModelInfo | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Ends every session's stream and closes the channel. Server sessions stay until closed or expired."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions):
            session._drop_stream()
        await self._channel.close()

    async def model_info(self) -> ModelInfo:
        """What the server serves (kind, vocabulary, sizes, steppable, provider, limits)."""
        info = _wire.model_info(await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))
        self._info = info
        return info

    async def infer(self, tokens: Tokens | None = None, *, features: Any = None) -> np.ndarray:
        """Logits float32 [positions, output_size] of a whole sequence from zero state, without a session."""
        _core.require_one_input(tokens, features)
        request = pb.InferRequest()
        if tokens is not None:
            request.tokens.extend(await self._token_ids(tokens))
        else:
            request.features.CopyFrom(_wire.encode_features(as_features(features)))
        reply: pb.InferResponse = await self._unary(self._stub.Infer, request)
        return _wire.decode_logits(reply.logits)

    def session(
        self, resume: str | None = None, *, restore: bytes | None = None, close_on_exit: bool | None = None
    ) -> AsyncSession:
        """A new session, the live session `resume`, or a new session from a snapshot blob
        (`restore`); opened by `await` or `async with`.

        `s = await client.session()` or `async with client.session() as s:`. On
        leaving `async with`, a new session is closed on the server, a resumed one
        only detached, unless `close_on_exit` says otherwise.
        """
        if resume is not None and restore is not None:
            raise ValueError("pass at most one of resume and restore")
        session = AsyncSession(self, resume, restore=restore, close_on_exit=close_on_exit)
        self._sessions.add(session)
        return session

    async def step_sessions(
        self,
        tokens: Mapping[AsyncSession, Tokens] | None = None,
        *,
        features: Mapping[AsyncSession, Any] | None = None,
        output: OutputKind = "logits",
        k: int = 5,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[StepOutput | LstmServeError]:
        """One step of each of many sessions of this client, in one `StepSessions` call; see
        `Client.step_sessions` (the same outcomes, resends and refusals). Sessions not yet opened are
        opened first (an error opening one is raised)."""
        sessions, requests = await self._session_steps(tokens, features, output, k, temperature, top_k, top_p, seed)
        for session in sessions:
            await session.open()
        async with contextlib.AsyncExitStack() as locks:
            for session in sorted(sessions, key=_lock_order):  # one order for every caller: no deadlock
                await locks.enter_async_context(session._lock)
            exchange = _core.MultiStepExchange([s._core for s in sessions], requests, self.retry)
            for state in exchange.needs_resync():
                try:
                    state.step = (await self._get_session(state.id)).step
                except LstmServeError as error:
                    exchange.resync_failed(state, error)
            while (delay := exchange.next_attempt()) is not None:
                try:
                    if delay:
                        await asyncio.sleep(delay)
                    call = self._stub.StepSessions(exchange.request(), timeout=self.timeout, metadata=self._metadata)
                    response = await call
                except grpc.RpcError as error:
                    exchange.failed(error)
                    continue
                except BaseException:  # interrupted (task cancelled): the entries sent may have been applied
                    exchange.interrupted()
                    raise
                exchange.answered(response)
            return exchange.outcomes(output)

    # ---- internals -------------------------------------------------------
    async def _session_steps(
        self,
        tokens: Mapping[AsyncSession, Tokens] | None,
        features: Mapping[AsyncSession, Any] | None,
        output: OutputKind,
        k: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
    ) -> tuple[list[AsyncSession], list[pb.SessionStep]]:
        """The sessions of a `step_sessions` call and each one's SessionStep (not yet stamped)."""
        _core.require_one_input(tokens, features)
        sample = _wire.sampling(temperature, top_k, top_p, seed) if output == "sample" else None
        sessions: list[AsyncSession] = []
        requests: list[pb.SessionStep] = []
        for session, value in (tokens or features or {}).items():
            if not isinstance(session, AsyncSession) or session._client is not self:
                raise ValueError(
                    f"{session!r} is not an AsyncSession of this client: step_sessions steps its own sessions"
                )
            sessions.append(session)
            requests.append(
                _wire.session_step(
                    tokens=await self._token_ids(value) if tokens is not None else None,
                    features=as_features(value) if features is not None else None,
                    output=output,
                    k=k,
                    sample=sample,
                )
            )
        return sessions, requests

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        """Calls a unary RPC, retrying UNAVAILABLE."""
        call = _core.UnaryCall(self.retry)
        metadata = _wire.call_metadata(self._metadata, request)
        while (delay := call.next_attempt()) is not None:
            if delay:
                await asyncio.sleep(delay)
            try:
                return await method(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as error:
                call.failed(error)
        raise call.error()

    async def _create(self, method: Callable[..., Awaitable[Any]], request: Any) -> SessionInfo:
        """Creates (or restores) a session under the id `request` proposes (see `_core.already_created`)."""
        try:
            return _wire.session_info(await self._unary(method, request))
        except LstmServeError as error:
            if not _core.already_created(error):
                raise
            return await self._get_session(request.session_id)

    async def _get_session(self, session_id: str) -> SessionInfo:
        return _wire.session_info(await self._unary(self._stub.GetSession, pb.SessionRef(session_id=session_id)))

    async def _token_ids(self, tokens: Tokens) -> list[int]:
        if isinstance(tokens, str) and self._info is None:
            await self.model_info()
        return _core.token_ids(tokens, self._info)


def _lock_order(session: AsyncSession) -> tuple[str, int]:
    return session.id, id(session)


class AsyncSession:
    """One server-side session for asyncio; get one from `AsyncClient.session()` and `await` it (or `async with`).

    Args:
        client: the client it belongs to.
        resume: the id of a live session to reattach to; None creates a new one.
        restore: a snapshot blob to create the new session from.
        close_on_exit: whether leaving `async with` closes the session on the server
            (default: yes for a new session, no for a resumed one).
    """

    def __init__(
        self,
        client: AsyncClient,
        resume: str | None = None,
        *,
        restore: bytes | None = None,
        close_on_exit: bool | None = None,
    ) -> None:
        self._client = client
        self._resume = resume
        self._restore = restore
        self._core = _core.SessionState(None, None, client.timeout)
        self.close_on_exit = _core.close_on_exit(resume, close_on_exit)
        self._stream: _AsyncStream | None = None
        self._generation: AsyncGeneration | None = None  # the last one started; live while the core says so
        self._lock = asyncio.Lock()

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self.open().__await__()

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.close_on_exit:
            await self.close()
        else:
            await self.detach()

    def __repr__(self) -> str:
        return f"AsyncSession(id={self._core.session_id!r}, step={self._core.step})"

    async def open(self) -> AsyncSession:
        """Creates (or resumes) the session on the server; a no-op once open. Returns self.

        Raises:
            SessionNotFound: the session to resume is unknown, closed or expired.
            ServerBusy: the server's max_sessions is reached.
        """
        async with self._lock:
            self._core.check_open()
            if self._core.session_id is None:
                if self._resume is not None:
                    info = await self._client._get_session(self._resume)
                elif self._restore is not None:
                    request = pb.RestoreSessionRequest(blob=self._restore, session_id=_wire.new_session_id())
                    info = await self._client._create(self._client._stub.RestoreSession, request)
                else:
                    request = pb.CreateSessionRequest(session_id=_wire.new_session_id())
                    info = await self._client._create(self._client._stub.CreateSession, request)
                self._core.opened(info)
        return self

    @property
    def id(self) -> str:
        """The session id; `session(resume=id)` (on any client) reattaches to it."""
        return self._core.id

    @property
    def position(self) -> int | None:
        """The step counter as this client last saw it (None before opening or right after an interrupted call)."""
        return self._core.step

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._core.closed

    async def step(
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
        """Feeds tokens or feature rows and returns what `output` asks for; see `Session.step`."""
        _core.require_one_input(tokens, features)
        sample = _wire.sampling(temperature, top_k, top_p, seed) if output == "sample" else None
        request = _wire.step_request(
            tokens=await self._client._token_ids(tokens) if tokens is not None else None,
            features=as_features(features) if features is not None else None,
            output=output,
            k=k,
            sample=sample,
        )
        await self.open()
        async with self._lock:
            self._core.check_open()
            await self._settle()
            response = await self._exchange(self._core.begin_step(request, self._client.retry))
        return _wire.step_output(response, output)

    async def generate(
        self,
        prompt: Tokens,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncGeneration:
        """Feeds `prompt`, then streams up to `max_tokens` generated tokens: `async for t in await s.generate(...)`.

        Same semantics as `Session.generate`.
        """
        sample = _wire.sampling(temperature, top_k, top_p, seed)
        request = _wire.generate_request(await self._client._token_ids(prompt), max_tokens, sample, stop)
        await self.open()
        return AsyncGeneration(self, request)

    async def complete(
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
        generation = await self.generate(
            prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop
        )
        async for _ in generation:
            pass
        return generation._state.completion()

    async def snapshot(self) -> bytes:
        """An opaque, versioned, integrity-checked copy of the session's state and step counter.

        `client.session(restore=blob)` recreates the session on any server of the same model.
        """
        await self.open()
        async with self._lock:
            self._core.check_open()
            await self._settle(resync=False)
            reply = await self._client._unary(self._client._stub.SnapshotSession, pb.SessionRef(session_id=self.id))
            self._core.step = int(reply.step)
            return bytes(reply.blob)

    async def reset(self) -> SessionInfo:
        """Returns the session to zero state and step 0."""
        await self.open()
        async with self._lock:
            self._core.check_open()
            await self._settle(resync=False)
            reply = await self._client._unary(self._client._stub.ResetSession, pb.SessionRef(session_id=self.id))
            info = _wire.session_info(reply)
            self._core.step = info.step
            return info

    async def info(self) -> SessionInfo:
        """The session as the server sees it (step counter, idle time, time to expiry)."""
        await self.open()
        return await self._client._get_session(self.id)

    async def close(self) -> None:
        """Closes the session on the server and frees its state. Idempotent: an expired session is not an error."""
        async with self._lock:  # taken first: an open() in another task finishes before we look at the id
            if not self._core.begin_close():
                return
            self._drop_stream()
            try:
                await self._client._unary(self._client._stub.CloseSession, pb.SessionRef(session_id=self.id))
            except SessionNotFound:
                pass

    async def detach(self) -> None:
        """Ends this object's stream but keeps the server session (resume it later by `id`)."""
        async with self._lock:
            self._core.detach()
            self._drop_stream()

    # ---- internals -------------------------------------------------------
    def _ensure_stream(self) -> _AsyncStream:
        if self._stream is None or not self._stream.alive:
            self._drop_stream()
            self._stream = _AsyncStream(self._client._stub, _wire.with_session(self._client._metadata, self.id))
        return self._stream

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    async def _settle(self, *, resync: bool = True) -> None:
        """Finishes an unfinished generation and learns the step counter if it is unknown."""
        generation = self._generation
        if generation is not None and self._core.generation is generation._state:
            try:
                await generation._drain()
            except LstmServeError:
                pass  # the step counter is re-read below
        if self._core.needs_resync(resync):
            self._core.step = (await self._client._get_session(self.id)).step

    async def _exchange(self, exchange: _core.StepExchange) -> pb.StepResponse:
        """Sends a one-response request; after a transient stream failure resends it on a new stream."""
        while (delay := exchange.next_attempt()) is not None:
            if delay:
                await asyncio.sleep(delay)
            stream = self._ensure_stream()
            try:
                await stream.send(exchange.request)
                response = await stream.recv(self._client.timeout)
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

    async def _start_generation(self, generation: AsyncGeneration) -> None:
        """Settles the session and sends the generation's request; a failure ends the generation."""
        state = generation._state
        try:
            self._core.check_open()
            await self._settle()
        except BaseException as error:
            raise state.broken(error) from None
        request = self._core.begin_generation(state)
        self._generation = generation
        generation._stream = stream = self._ensure_stream()  # a stream found broken is replaced before sending
        try:
            await stream.send(request)
        except BaseException as error:  # the request may or may not have left: not resent
            self._drop_stream()
            raise state.broken(error) from None


class AsyncGeneration(AsyncIterator[GeneratedToken]):
    """The tokens of one `AsyncSession.generate` call as they are produced (an async iterator).

    After the last token, `finish_reason` is "length" or "stop" and `step` is the
    session's step counter. `text` is the text so far.
    """

    def __init__(self, session: AsyncSession, request: pb.StepRequest) -> None:
        self._session = session
        self._state = _core.GenerationState(session._core, request)
        self._stream: _AsyncStream | None = None

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> GeneratedToken:
        async with self._session._lock:
            item = self._state.buffered()
            if item is not None:
                return item
            if self._state.done:
                raise StopAsyncIteration
            if not self._state.started:
                await self._session._start_generation(self)
            item = await self._read()
            if item is None:
                raise StopAsyncIteration
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

    async def _read(self) -> GeneratedToken | None:
        """The next token, or None after the final response."""
        assert self._stream is not None
        try:
            response = await self._stream.recv(self._session._client.timeout)
        except BaseException as error:  # broken or interrupted: the rest cannot be read in order any more
            self._session._drop_stream()
            raise self._state.broken(error) from None
        return self._state.received(response)

    async def _drain(self) -> None:
        """Reads the rest of the generation (another call on the session needs the stream)."""
        if self._state.supersede():
            while not self._state.done:
                await self._read()
